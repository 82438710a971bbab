"""Black-box check of speculative serving: a server started with `--spec` answers exactly what a
plain server answers (greedy text and logprobs, streamed and not, several requests at once), reports
the speculation figures in `usage`, and exports them in /metrics. Run by crates/tandem/tests/server.rs.

usage: python3 test_spec.py PLAIN_URL SPEC_URL MODEL_NAME
"""
import concurrent.futures
import re
import sys
import urllib.request

import openai

PLAIN, SPEC, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]
plain = openai.OpenAI(base_url=PLAIN + "/v1", api_key="unused", max_retries=0, timeout=300)
spec = openai.OpenAI(base_url=SPEC + "/v1", api_key="unused", max_retries=0, timeout=300)

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n"
PROMPTS = [
    "Repeat this code exactly, then add a function div:\n" + CODE,
    "Write a haiku about the sea.",
    "List the numbers from 1 to 20 separated by commas.",
    "Translate to French: The cat sleeps on the warm windowsill.",
]


def chat(client, prompt, stream=False, extra=None):
    args = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=80,
                logprobs=True, top_logprobs=2, **(extra or {}))
    if not stream:
        r = client.chat.completions.create(**args)
        c = r.choices[0]
        calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        return (c.message.content, calls), [(t.token, t.logprob) for t in c.logprobs.content], r.usage
    text, lps, usage, calls = "", [], None, []
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            calls += [(t.function.name, t.function.arguments) for t in c.delta.tool_calls or []]
            if c.logprobs and c.logprobs.content:
                lps += [(t.token, t.logprob) for t in c.logprobs.content]
    return (text or None, calls), lps, usage


def main():
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # Presence and frequency penalties on some: a draft is judged by the penalised target,
        # counting the tokens accepted before it in the same step.
        penalised = {"presence_penalty": 0.3, "frequency_penalty": 0.8}
        jobs = [(p, s, None) for p in PROMPTS for s in (False, True)] + [(p, False, penalised) for p in PROMPTS[::2]]
        # And an answer held past its end (and past EOS) by vLLM's `min_tokens`.
        jobs.append((PROMPTS[3], False, {"extra_body": {"min_tokens": 60}}))
        # And structured outputs: each draft token is judged by the target under the grammar's
        # mask at its own position (the grammar advanced by the tokens accepted before it).
        jobs.append((PROMPTS[2], False, {"extra_body": {"guided_regex": r"(\d+, ){19}\d+"}}))
        code_schema = {"type": "object", "properties": {"language": {"type": "string"}, "code": {"type": "string"}},
                       "required": ["language", "code"], "additionalProperties": False}
        jobs.append((PROMPTS[0], True, {"response_format": {"type": "json_schema", "json_schema": {
            "name": "code", "schema": code_schema}}}))
        # And a tool call the answer is held to (its arguments' schema, the call's tags).
        tools = [{"type": "function", "function": {"name": "run", "parameters": {"type": "object", "properties": {
            "code": {"type": "string"}}, "required": ["code"]}}}]
        jobs.append((PROMPTS[0], False, {"tools": tools, "tool_choice": "required"}))
        jobs.append((PROMPTS[0], True, {"tools": tools, "tool_choice": "required"}))
        want = list(pool.map(lambda j: chat(plain, *j), jobs))
        got = list(pool.map(lambda j: chat(spec, *j), jobs))
    accepted = 0
    for (p, s, _), w, g in zip(jobs, want, got):
        assert g[0] == w[0], f"text differs (stream={s}) for {p[:30]!r}:\n{w[0]!r}\n{g[0]!r}"
        assert g[1] == w[1], f"logprobs differ (stream={s}) for {p[:30]!r}"
        sp = g[2].model_extra.get("speculation")
        assert sp and sp["decode_steps"] > 0 and sp["accepted_tokens"] <= sp["drafted_tokens"], g[2]
        assert (w[2].model_extra or {}).get("speculation") is None
        accepted += sp["accepted_tokens"]
    assert accepted > 0, "the n-gram drafter never got a token accepted"
    metrics = urllib.request.urlopen(SPEC + "/metrics").read().decode()
    for name in ['tandem_spec_drafter_info{drafter="ngram"} 1', "tandem_spec_draft_tokens_total",
                 "tandem_spec_accepted_tokens_total", "tandem_spec_acceptance_length", 'phase="verify"']:
        assert name in metrics, name
    # Every engine step is tallied under one kind; together they emitted each request's first
    # token (as its prompt finished) and every token the decode steps emitted (counted apart).
    def series(name):
        return {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith(name + "{")}
    emitted = series("tandem_engine_step_emitted_tokens_total")
    assert set(emitted) == {"prefill", "plain", "copied", "drafted"}, emitted
    decoded = float(re.search(r"^tandem_spec_emitted_tokens_total (\S+)$", metrics, re.M).group(1))
    assert sum(emitted.values()) == decoded + len(jobs), (emitted, decoded)
    assert series("tandem_engine_steps_total")["drafted"] > 0, metrics
    assert 'tandem_engine_step_seconds_total{kind="prefill"}' in metrics
    # A step's drafting and forward are parts of its time.
    total, drafting, forward = (series(f"tandem_engine_step{s}_seconds_total") for s in ("", "_drafting", "_forward"))
    assert all(drafting[k] + forward[k] <= total[k] + 1e-9 for k in total), (total, drafting, forward)
    assert drafting["drafted"] > 0 and forward["drafted"] > 0, (drafting, forward)
    print(f"ok     speculative server equals plain server ({len(jobs)} requests, {accepted} draft tokens accepted)")


if __name__ == "__main__":
    main()
