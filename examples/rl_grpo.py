#!/usr/bin/env python3
"""GRPO-style RL with the official Tinker SDK, against `tandem serve` on this machine.

Tasks (`--task`), in a few-shot completion prompt, checked by a program:
- `addition`: "12 + 34 = 46\\n...\\n57 + 25 =": reward 1 when the sampled answer is the right sum;
- `count`: "Count from 5 to 9: 5, 6, 7, 8, 9\\n...\\nCount from 117 to 135:": the share of the
  numbers written right (in order, up to the first mistake), 1 only when exact and stopped. Its
  rollouts are 40-80 tokens, long enough for speculative decoding to matter (see --spec-metrics).
Problems come from a fixed pool (`--pool`), a few per step, so the reward curve measures learning
rather than which problems happened to be drawn. Each step samples a group of answers per problem
from the *current* LoRA weights (save_weights_and_get_sampling_client: no copy, no restart; tandem
samples them through its own engine), sets advantage = reward - group mean, and trains with the
importance_sampling loss on the sampler's logprobs.

Per step it reports the rollouts' tokens/s and, from the server's /metrics (a server started with
`--spec ...`), the acceptance length of those rollouts' verification steps, the chosen draft length
and the served drafter version.

Run (two terminals, or `&`):
    tandem serve --model smollm2 --max-batch 16 --step-token-budget 256
    python3 examples/rl_grpo.py --minutes 10

Writes a per-step table (stdout and OUT.txt), OUT.json, and OUT.png (reward per step; needs
matplotlib). Needs: pip install tinker==0.38.0 (and matplotlib for the plot).
"""
import argparse
import json
import logging
import os
import random
import re
import time

os.environ.setdefault("TINKER_API_KEY", "tml-tandem-local")  # the SDK wants a key; tandem ignores it
os.environ.setdefault("TINKER_TELEMETRY", "0")

import numpy as np
import tinker
from tinker import types

logging.getLogger("tinker").setLevel(logging.ERROR)  # long polls answer try_again: not news


def problem(rng, shots):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    lines = []
    for _ in range(shots):
        x, y = rng.randint(10, 99), rng.randint(10, 99)
        lines.append(f"{x} + {y} = {x + y}")
    return "\n".join(lines) + f"\n{a} + {b} =", a + b


def addition_reward(text, answer):
    m = re.match(r"\s*(-?\d+)", text)
    return 1.0 if m is not None and int(m.group(1)) == answer else 0.0


def count_problem(rng, shots):
    def one():
        a = rng.randint(1, 400)
        return a, a + rng.randint(10, 20)
    lines = []
    for _ in range(shots):
        a, b = one()
        lines.append(f"Count from {a} to {b}: " + ", ".join(str(x) for x in range(a, b + 1)))
    a, b = one()
    return "\n".join(lines) + f"\nCount from {a} to {b}:", (a, b)


def count_reward(text, answer, stopped):
    a, b = answer
    want = list(range(a, b + 1))
    got = [t.strip() for t in text.strip().split(",")]
    right = 0
    for w, g in zip(want, got):
        if g != str(w):
            break
        right += 1
    exact = right == len(want) and len(got) == len(want) and stopped
    return 1.0 if exact else 0.9 * right / len(want)


def scrape(url):
    """The server's speculation figures (/metrics), or None when it does not speculate."""
    import httpx
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except Exception:
        return None
    m = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        try:
            m[name] = float(value)
        except ValueError:
            pass
    return m if "tandem_spec_decode_steps_total" in m else None


TASKS = {
    # name: (problem maker, reward(text, answer, stopped), max tokens, stop)
    "addition": (problem, lambda text, answer, stopped: addition_reward(text, answer), 4, ["\n"]),
    "count": (count_problem, count_reward, 96, ["\n"]),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--task", choices=sorted(TASKS), default="addition")
    ap.add_argument("--minutes", type=float, default=10.0, help="stop starting new steps after this long")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=32, help="distinct problems (0: a fresh one every time)")
    ap.add_argument("--problems", type=int, default=8, help="problems per step")
    ap.add_argument("--group", type=int, default=8, help="samples per problem")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: bench-results/rl-TASK")
    args = ap.parse_args()
    args.out = args.out or f"bench-results/rl-{args.task}"
    make_problem, reward, max_tokens, stop = TASKS[args.task]

    service = tinker.ServiceClient(base_url=args.base_url)
    caps = tinker.RestClient(base_url=args.base_url).get_server_capabilities().result()
    base = caps.supported_models[0].model_name
    training = service.create_lora_training_client(base_model=base, rank=args.rank, seed=args.seed).result()
    tokenizer = training.get_tokenizer()
    rng = random.Random(args.seed)
    pool = [make_problem(rng, args.shots) for _ in range(args.pool)]
    rows, start = [], time.time()
    print(f"model {base}, task {args.task}, LoRA rank {args.rank}, {args.problems} problems x {args.group} samples per step")
    print(f"{'step':>4} {'reward':>7} {'solved':>7} {'datums':>6} {'sample s':>8} {'tok/s':>6} {'accept':>6} "
          f"{'k':>2} {'drafter':>7} {'train s':>7} {'elapsed':>7}")
    for step in range(args.steps):
        if time.time() - start > args.minutes * 60:
            break
        t0 = time.time()
        sampler = training.save_weights_and_get_sampling_client().result()
        problems = rng.sample(pool, args.problems) if pool else [make_problem(rng, args.shots) for _ in range(args.problems)]
        prompts = [tokenizer.encode(p) for p, _ in problems]
        before = scrape(args.base_url)
        t_sample = time.time()
        futures = [
            sampler.sample(types.ModelInput.from_ints(ids), num_samples=args.group,
                           sampling_params=types.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=stop))
            for ids in prompts
        ]
        results = [fut.result().sequences for fut in futures]
        t1 = time.time()
        after = scrape(args.base_url)
        data, rewards, solved, sampled = [], [], 0, 0
        for (text, answer), ids, seqs in zip(problems, prompts, results):
            rs = [reward(tokenizer.decode(s.tokens), answer, s.stop_reason == "stop") for s in seqs]
            sampled += sum(len(s.tokens) for s in seqs)
            rewards += rs
            solved += max(rs) >= 1.0
            mean = float(np.mean(rs))
            if all(r == mean for r in rs):
                continue  # no preference within the group: nothing to learn
            for s, r in zip(seqs, rs):
                full = list(ids) + list(s.tokens)
                n_prompt = len(ids) - 1
                data.append(types.Datum(
                    model_input=types.ModelInput.from_ints(full[:-1]),
                    loss_fn_inputs={
                        "target_tokens": full[1:],
                        "logprobs": [0.0] * n_prompt + list(s.logprobs),
                        "advantages": [0.0] * n_prompt + [r - mean] * len(s.tokens),
                    },
                ))
        if data:
            fb = training.forward_backward(data, "importance_sampling")
            opt = training.optim_step(types.AdamParams(learning_rate=args.lr, grad_clip_norm=args.clip))
            fb.result(), opt.result()
        t2 = time.time()
        spec = {}
        if before and after:
            d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)
            steps = d("tandem_spec_decode_steps_total")
            spec = {"acceptance": d("tandem_spec_emitted_tokens_total") / steps if steps else None,
                    "chosen_k": after.get("tandem_spec_chosen_k"), "drafter_version": after.get("tandem_drafter_version")}
        row = {"step": step, "reward": float(np.mean(rewards)), "solved": solved / len(problems),
               "datums": len(data), "sample_s": t1 - t0, "rollout_tokens": sampled,
               "rollout_tok_s": sampled / max(t1 - t_sample, 1e-9), "train_s": t2 - t1, "elapsed_s": t2 - start, **spec}
        rows.append(row)
        fmt = lambda v, f: format(v, f) if v is not None else "-"
        print(f"{step:>4} {row['reward']:>7.3f} {row['solved']:>7.2f} {len(data):>6} {t1 - t0:>8.1f} "
              f"{row['rollout_tok_s']:>6.1f} {fmt(spec.get('acceptance'), '>6.2f'):>6} {fmt(spec.get('chosen_k'), '>2.0f'):>2} "
              f"{fmt(spec.get('drafter_version'), '>7.0f'):>7} {t2 - t1:>7.1f} {t2 - start:>7.0f}", flush=True)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    k = max(1, len(rows) // 5)
    first, last = np.mean([r["reward"] for r in rows[:k]]), np.mean([r["reward"] for r in rows[-k:]])
    summary = {"model": base, "args": vars(args), "steps": rows,
               "first_fifth_reward": first, "last_fifth_reward": last}
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    with open(args.out + ".txt", "w") as f:
        f.write(f"# examples/rl_grpo.py --task {args.task} on {base}: mean reward first fifth {first:.3f}, last fifth {last:.3f}\n")
        f.write("step reward solved datums sample_s rollout_tok_s acceptance chosen_k drafter_version train_s elapsed_s\n")
        for r in rows:
            f.write(f"{r['step']} {r['reward']:.3f} {r['solved']:.2f} {r['datums']} {r['sample_s']:.1f} {r['rollout_tok_s']:.1f} "
                    f"{r.get('acceptance')} {r.get('chosen_k')} {r.get('drafter_version')} {r['train_s']:.1f} {r['elapsed_s']:.0f}\n")
    print(f"mean reward: first fifth {first:.3f} -> last fifth {last:.3f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        xs = [r["step"] for r in rows]
        ys = [r["reward"] for r in rows]
        smooth = np.convolve(ys, np.ones(5) / 5, mode="valid") if len(ys) >= 5 else ys
        plt.figure(figsize=(7, 4))
        plt.plot(xs, ys, "o-", alpha=0.4, label="mean reward per step")
        plt.plot(xs[len(xs) - len(smooth):], smooth, "-", lw=2, label="5-step mean")
        plt.xlabel("RL step")
        plt.ylabel("reward")
        plt.title(f"GRPO, task {args.task}, {base}, LoRA r={args.rank}", fontsize=10)
        plt.legend()
        plt.grid(alpha=0.3)
        plt.tight_layout()
        plt.savefig(args.out + ".png", dpi=120)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
