#!/usr/bin/env python3
"""PyTorch peer for `tandem bench train`: the same decoder (Llama/Qwen2 family) written plainly in
PyTorch, LoRA adapters (PEFT-style: a ~ uniform, b = 0, scale alpha/rank) on the same projections,
timed on the same data: forward_backward (cross-entropy, summed) tokens/s for LoRA and full weights,
and the optimizer step after it (torch.optim.AdamW).

Usage: peer_torch_train.py DIR --mode lora|full --rank R --alpha A --batch B --seq-len L
DIR holds model.safetensors (Hugging Face names) and tandem_config.json. After a warm-up pass it
prints one JSON line (the pass's summed loss, so tandem can check it computes the same, and the
peak memory the pass added), then answers each line on stdin with one JSON line: `pass` times one
forward_backward, `step` one AdamW step. It exits when stdin closes.
"""
import argparse
import json
import math
import sys
import time

import torch
from safetensors.torch import load_file

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--mode", default="lora")
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--alpha", type=float, default=32.0)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq-len", type=int, default=128)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
# This process runs beside tandem's: if the two outgrow memory (Qwen2.5-Coder at 4 x 1024 on
# 24 GiB), the kernel should end the peer, not the benchmark.
try:
    open("/proc/self/oom_score_adj", "w").write("1000")
except OSError:
    pass
cfg = json.load(open(f"{a.dir}/tandem_config.json"))
W = load_file(f"{a.dir}/model.safetensors")
H, NH, KVH, D = cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
full = a.mode == "full"
params = {k: torch.nn.Parameter(v.float(), requires_grad=full) for k, v in W.items()}
if "lm_head.weight" not in params:
    params["lm_head.weight"] = params["model.embed_tokens.weight"]
lora = {}


def proj(x, name):
    y = x @ params[name + ".weight"].T
    if name + ".bias" in params:
        y = y + params[name + ".bias"]
    if name in lora:
        A, B = lora[name]
        y = y + (x @ A.T) @ B.T * (a.alpha / a.rank)
    return y


targets = []
for l in range(cfg["num_layers"]):
    for n in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
        targets.append(f"model.layers.{l}.{n}")
targets.append("lm_head")
if not full:
    g = torch.Generator().manual_seed(0)
    for t in targets:
        out_f, in_f = params[t + ".weight"].shape
        bound = 1 / math.sqrt(in_f)
        A = torch.nn.Parameter((torch.rand(a.rank, in_f, generator=g) * 2 - 1) * bound)
        B = torch.nn.Parameter(torch.zeros(out_f, a.rank))
        lora[t] = (A, B)

inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2).float() / D))


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * w


def rope(x, pos):
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    if cfg.get("rope_interleaved"):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def forward(ids):
    b, t = ids.shape
    x = params["model.embed_tokens.weight"][ids]
    pos = torch.arange(t)
    for l in range(cfg["num_layers"]):
        p = f"model.layers.{l}"
        h = rms(x, params[f"{p}.input_layernorm.weight"])
        q = proj(h, f"{p}.self_attn.q_proj").view(b, t, NH, D)
        k = proj(h, f"{p}.self_attn.k_proj").view(b, t, KVH, D)
        v = proj(h, f"{p}.self_attn.v_proj").view(b, t, KVH, D)
        if f"{p}.self_attn.q_norm.weight" in params:
            q = rms(q, params[f"{p}.self_attn.q_norm.weight"])
            k = rms(k, params[f"{p}.self_attn.k_norm.weight"])
        q, k = rope(q, pos), rope(k, pos)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
        x = x + proj(o.transpose(1, 2).reshape(b, t, NH * D), f"{p}.self_attn.o_proj")
        h = rms(x, params[f"{p}.post_attention_layernorm.weight"])
        m = torch.nn.functional.silu(proj(h, f"{p}.mlp.gate_proj")) * proj(h, f"{p}.mlp.up_proj")
        x = x + proj(m, f"{p}.mlp.down_proj")
    return proj(rms(x, params["model.norm.weight"]), "lm_head")


V = cfg["vocab_size"]
ids = torch.tensor([[(i * 7919 + j * 104729 + 13) % V for j in range(a.seq_len + 1)] for i in range(a.batch)])
def status_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return None


def train_pass():
    """One forward_backward, as tandem's: cross-entropy summed, no gradients pending before it."""
    logits = forward(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    return loss.item()


def drop_grads():
    for prm in list(params.values()) + [x for ab in lora.values() for x in ab]:
        prm.grad = None


# The warm-up pass measures the peak one forward_backward adds (Linux resets the peak with
# clear_refs 5) and the first loss.
try:
    open("/proc/self/clear_refs", "w").write("5")
    before = status_mib("VmRSS:")
except OSError:
    before = None
loss0 = train_pass()
peak = max(0.0, status_mib("VmHWM:") - before) if before is not None else None
drop_grads()


def optim_step_secs():
    """The optimizer step a training loop takes after each forward_backward: torch.optim.AdamW as
    a user builds it (defaults), timed on its second step (the first creates its state)."""
    trainable = list({id(p): p for p in list(params.values()) + [x for ab in lora.values() for x in ab]
                      if p.requires_grad}.values())
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    for _ in range(2):
        train_pass()
        t0 = time.time()
        opt.step()
        secs = time.time() - t0
        opt.zero_grad(set_to_none=True)
    return secs


def reply(obj):
    json.dump(obj, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


reply({"mode": a.mode, "loss_sum": loss0, "peak_mib": peak, "torch": torch.__version__,
       "threads": torch.get_num_threads()})
# Timed passes on request, one per line, so tandem can alternate its passes with these and a
# change in the host's speed reaches both sides alike.
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "pass":
        t0 = time.time()
        train_pass()
        reply({"secs": time.time() - t0})
        drop_grads()
    elif cmd == "step":
        reply({"optim_step_secs": optim_step_secs()})
    else:
        reply({"error": f"unknown command {cmd!r} (pass, step)"})
