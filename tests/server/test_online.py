"""A server started with `--spec eagle --spec-train online` answers exactly what a plain server
answers while its drafter is trained and hot-swapped under concurrent load, and /metrics shows the
training. Run by crates/tandem/tests/server.rs.

usage: python3 tests/server/test_online.py PLAIN_URL ONLINE_URL MODEL
"""
import concurrent.futures
import re
import sys
import time
import urllib.request

from openai import OpenAI

PLAIN, ONLINE, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]
plain = OpenAI(base_url=PLAIN + "/v1", api_key="x")
online = OpenAI(base_url=ONLINE + "/v1", api_key="x")

TOPICS = ["a Python function that reverses a list", "the water cycle", "how to make tea", "prime numbers",
          "a haiku about autumn", "binary search", "why the sky is blue", "a shopping list for pancakes"]


def ask(client, i):
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40,
                                       messages=[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}. ({i})"}])
    return r.choices[0].message.content, r.usage.model_extra.get("speculation")


def metric(text, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def main():
    done = 0
    deadline = time.time() + 240
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        # Rounds of concurrent requests until the trainer has published and the engine swapped in a
        # version; every answer must equal the plain server's.
        for round_ in range(12):
            ids = list(range(round_ * 12, round_ * 12 + 12))
            want = list(pool.map(lambda i: ask(plain, i), ids))
            got = list(pool.map(lambda i: ask(online, i), ids))
            for i, (w, g) in zip(ids, zip(want, got)):
                assert g[0] == w[0], f"request {i} differs while training:\n{w[0]!r}\n{g[0]!r}"
                assert g[1] is not None and g[1]["decode_steps"] > 0, g[1]
            done += len(ids)
            m = urllib.request.urlopen(ONLINE + "/metrics").read().decode()
            if metric(m, "tandem_drafter_version") >= 1 or time.time() > deadline:
                break
    for name in ["tandem_drafter_published_version", "tandem_drafter_rollbacks_total", "tandem_drafter_train_loss",
                 "tandem_spec_chosen_k", "tandem_traces_dropped_total", "tandem_spec_gain",
                 "tandem_drafter_train_cpu_share", "tandem_drafter_train_turns_total",
                 "tandem_drafter_train_turn_seconds_total", "tandem_spec_alternatives_total",
                 "tandem_spec_alternatives_accepted_total"]:
        metric(m, name)
    # The draft-length controller's figures per k (k = 0 is always measured).
    for name in ["tandem_spec_k_tokens_per_second", "tandem_spec_k_tokens_per_step", "tandem_spec_k_step_seconds"]:
        assert metric(m, name + '{k="0"}') > 0, name
    assert metric(m, "tandem_traces_total") >= done - 6, "traces were not recorded"
    assert metric(m, "tandem_drafter_train_steps_total") >= 1, "the trainer never stepped"
    assert metric(m, "tandem_drafter_version") >= 1, "no drafter version was swapped in"
    print(f"ok     online-training server equals plain server ({done} requests, "
          f"drafter version {metric(m, 'tandem_drafter_version'):.0f}, "
          f"{metric(m, 'tandem_drafter_train_steps_total'):.0f} trainer steps)")


if __name__ == "__main__":
    main()
