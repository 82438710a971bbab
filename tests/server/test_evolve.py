"""Several models in one `tandem serve`, the scoring call, and evolving models, driven like users
drive them (the official `openai` client and raw HTTP). Run by crates/tandem/tests/server.rs
against a server started with two models (A, B) and two evolving models over them:
`evolver` (Squeeze Evolve, n=4 k=2 t=2, p=50) and `slow-evolver` (large, for cancellation).

usage: python3 test_evolve.py BASE_URL MODEL_A MODEL_B
"""
import http.client
import json
import math
import re
import sys
import time
import urllib.parse

import openai
from harness import run_tests

BASE, A, B = sys.argv[1], sys.argv[2], sys.argv[3]
HOST = urllib.parse.urlparse(BASE)
CLIENT = "evolve-tester"
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=300,
                       default_headers={"X-Tandem-Client": CLIENT})
QUESTION = "Ana has 12 apples. Then Ana buys 5 more. How many apples does Ana have now? End with \"Answer: <number>\"."


def raw(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=300)
    h = {"Content-Type": "application/json", "X-Tandem-Client": CLIENT}
    h.update(headers or {})
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def metrics():
    return raw("GET", "/metrics")[1].decode()


def metric(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


def test_models_lists_every_model_and_requests_route_by_name():
    ids = [m.id for m in client.models.list().data]
    assert ids == [A, B, "evolver", "slow-evolver"], ids
    for name in (A, B):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0)
        assert r.model == name and r.usage.completion_tokens > 0, r
    status, data = raw("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    err = json.loads(data)["error"]["message"]
    assert status == 404 and A in err and "evolver" in err, (status, err)
    # Each model's engine charges the client on its own series.
    text = metrics()
    for name in (A, B):
        assert metric(text, "tandem_client_service_tokens_total", model=name, client=CLIENT, kind="output") > 0, name
    assert metric(text, "tandem_requests_total", endpoint="/v1/chat/completions", status="200") >= 2


def slow_way(model, prompt_ids, token_ids, top_k):
    """Each continuation token's logprob and top-k mean by decoding it: one completion per token,
    forced with a logit bias (logprobs are reported under the raw distribution)."""
    out = []
    for j, tok in enumerate(token_ids):
        r = client.completions.create(model=model, prompt=prompt_ids + token_ids[:j], max_tokens=1, temperature=0,
                                      logprobs=top_k, logit_bias={str(tok): 100})
        lp = r.choices[0].logprobs
        top = list(lp.top_logprobs[0].values())
        out.append((lp.token_logprobs[0], sum(top) / len(top)))
    return out


def ids_of(model, text):
    """`text`'s token ids as the server tokenizes it: the scoring call names each scored token."""
    status, data = raw("POST", "/tandem/v1/score", {"model": model, "prompt": [1], "continuations": [text],
                                                     "per_token": True, "top_k": 1})
    assert status == 200, data
    return [t["id"] for t in json.loads(data)["data"][0]["per_token"]]


def test_scoring_equals_the_slow_way_and_is_one_batched_prefill():
    prompt = "The capital of France is"
    conts = [" Paris, a city on the Seine.", " Rome."]
    status, data = raw("POST", "/tandem/v1/score", {"model": B, "prompt": prompt, "continuations": conts,
                                                     "top_k": 5, "per_token": True})
    assert status == 200, data
    body = json.loads(data)
    assert body["model"] == B and len(body["data"]) == 2
    prompt_ids = ids_of(B, prompt)
    for item, text in zip(body["data"], conts):
        ids = [t["id"] for t in item["per_token"]]
        assert ids == ids_of(B, text)
        slow = slow_way(B, prompt_ids, ids, 5)
        for got, (lp, mean) in zip(item["per_token"], slow):
            assert abs(got["logprob"] - lp) < 2e-3, (got, lp)
            assert abs(got["top_mean"] - mean) < 2e-3, (got, mean)
        c = -sum(t["top_mean"] for t in item["per_token"]) / len(ids)
        assert math.isclose(item["confidence"], c, rel_tol=1e-5), (item["confidence"], c)
        assert math.isclose(item["logprob"], sum(t["logprob"] for t in item["per_token"]), rel_tol=1e-5)
    # Nothing generated; each continuation's prompt counted with it.
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == sum(len(prompt_ids) + d["tokens"] for d in body["data"])
    # Chat form: scored after the assistant's turn is opened.
    status, data = raw("POST", "/tandem/v1/score", {"model": A, "messages": [{"role": "user", "content": "Hi"}],
                                                     "continuations": ["Hello!"]})
    assert status == 200 and json.loads(data)["data"][0]["confidence"] > 0, data
    for bad, what in [({"prompt": "x", "continuations": []}, "continuations"),
                      ({"prompt": "x", "continuations": ["a"], "top_k": 0}, "top_k"),
                      ({"continuations": ["a"]}, "exactly one of"),
                      ({"prompt": "x", "continuations": [""]}, "empty"),
                      ({"prompt": "x", "continuations": ["a"], "topk": 3}, "topk"),
                      ({"model": "evolver", "prompt": "x", "continuations": ["a"]}, "chat/completions")]:
        status, data = raw("POST", "/tandem/v1/score", bad)
        assert status == 400 and what in json.loads(data)["error"]["message"], (bad, status, data)


def test_echo_with_logprobs_reports_the_prompt_and_max_tokens_0_scores_it_alone():
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = ids_of(B, prompt)
    r = client.completions.create(model=B, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0, r
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None, lp
    assert "".join(lp.tokens) == prompt and lp.text_offset[0] == 0
    status, data = raw("POST", "/tandem/v1/score", {"model": B, "prompt": ids[:1], "continuations": [ids[1:]],
                                                     "per_token": True, "top_k": 3})
    for got, want in zip(lp.token_logprobs[1:], json.loads(data)["data"][0]["per_token"]):
        assert abs(got - want["logprob"]) < 1e-4, (got, want)
    assert all(len(t) == 3 for t in lp.top_logprobs[1:]), lp.top_logprobs
    # With tokens to generate: the prompt's logprobs, then the completion's, which is unchanged.
    plain = client.completions.create(model=B, prompt=prompt, max_tokens=6, temperature=0, logprobs=1)
    both = client.completions.create(model=B, prompt=prompt, max_tokens=6, temperature=0, logprobs=1, echo=True)
    assert both.choices[0].text == prompt + plain.choices[0].text
    assert both.choices[0].logprobs.token_logprobs[len(ids):] == plain.choices[0].logprobs.token_logprobs
    status, data = raw("POST", "/v1/completions", {"model": B, "prompt": prompt, "max_tokens": 0})
    assert status == 400 and "max_tokens" in json.loads(data)["error"]["message"], data


def test_an_evolving_model_answers_with_the_cost_of_every_call_accounted():
    before = metrics()
    r = client.chat.completions.create(model="evolver", messages=[{"role": "user", "content": QUESTION}], seed=3)
    assert r.model == "evolver" and r.choices[0].message.content.strip(), r
    ev = r.usage.model_extra["tandem_evolve"]
    assert len(ev["rounds"]) == 2 and ev["rounds"][1]["routed"] == {"tier0": 2, "tier1": 2}, ev["rounds"]
    by = ev["by_model"]
    assert set(by) == {A, B, B + " (score)"}, by
    # n first samples on A; 2 aggregations each on A and B; n scores on B.
    assert (by[A]["calls"], by[B]["calls"], by[B + " (score)"]["calls"]) == (6, 2, 4), by
    assert r.usage.prompt_tokens == sum(c["prompt_tokens"] for c in by.values())
    assert r.usage.completion_tokens == sum(c["completion_tokens"] for c in by.values())
    assert r.usage.prompt_tokens_details.cached_tokens > 0, "the question's prefix was shared"
    if ev["answer"] is not None:
        assert f"{ev['answer']}" in r.choices[0].message.content
    # Every child was charged to the caller, on both models' engines.
    after = metrics()
    for name in (A, B):
        grew = metric(after, "tandem_client_service_tokens_total", model=name, client=CLIENT, kind="input") - \
            metric(before, "tandem_client_service_tokens_total", model=name, client=CLIENT, kind="input")
        assert grew > 0, name
    assert metric(after, "tandem_evolve_requests_total", evolve="evolver") >= 1
    # The same seed evolves the same answer.
    again = client.chat.completions.create(model="evolver", messages=[{"role": "user", "content": QUESTION}], seed=3)
    assert again.choices[0].message.content == r.choices[0].message.content


def test_streaming_reports_each_round_then_the_answer():
    stream = client.chat.completions.create(model="evolver", messages=[{"role": "user", "content": QUESTION}],
                                            seed=4, stream=True, stream_options={"include_usage": True})
    rounds, content, usage = [], "", None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            if extra.get("reasoning_content"):
                rounds.append(chunk.model_extra["tandem_evolve"]["round"])
            content += c.delta.content or ""
    assert rounds == [1, 2], rounds
    assert content.strip() and usage is not None and usage.total_tokens > 0


def test_refusals_of_an_evolving_model():
    cases = [({"n": 2}, "`n` must be 1"), ({"logprobs": True}, "no logprobs"),
             ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}]}, "one question"),
             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "call no tools"),
             ({"guided_regex": "[0-9]+"}, "not held to a grammar")]
    for extra, what in cases:
        body = {"model": "evolver", "messages": [{"role": "user", "content": QUESTION}]}
        body.update(extra)
        status, data = raw("POST", "/v1/chat/completions", body)
        assert status == 400 and what in json.loads(data)["error"]["message"], (extra, status, data)
    status, data = raw("POST", "/v1/completions", {"model": "evolver", "prompt": "x"})
    assert status == 400 and "chat/completions" in json.loads(data)["error"]["message"], data


def test_an_evolution_does_not_starve_another_client():
    """A client's evolution (32 samples of up to 200 tokens, then aggregations: minutes of work
    that fill every batch slot) and another client's short request: the fair scheduler charges
    the evolution's children to their caller, so the other client is served within seconds."""
    import threading
    conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=60)
    body = {"model": "slow-evolver", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "X-Tandem-Client": "hog"})
    r = conn.getresponse()
    r.fp.readline()
    deadline = time.time() + 30
    while metric(metrics(), "tandem_client_waiting_requests", client="hog") == 0:
        assert time.time() < deadline, "the evolution never filled the batch"
        time.sleep(0.05)
    polite = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=120,
                           default_headers={"X-Tandem-Client": "polite"})
    start = time.time()
    out = polite.chat.completions.create(model=A, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8,
                                         temperature=0)
    waited = time.time() - start
    still = metric(metrics(), "tandem_client_waiting_requests", client="hog")
    conn.sock.close()
    conn.close()
    assert out.usage.completion_tokens > 0
    assert still > 0, "the evolution was still queued when the other client was served"
    assert waited < 15, f"the other client waited {waited:.1f} s behind the evolution"


def test_a_client_that_disconnects_cancels_its_evolution():
    conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=60)
    body = {"model": "slow-evolver", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "X-Tandem-Client": "leaver"})
    r = conn.getresponse()
    assert r.status == 200
    r.fp.readline()  # the opening chunk: the evolution runs
    deadline = time.time() + 30
    while metric(metrics(), "tandem_running_batch_size") == 0:
        assert time.time() < deadline, "the evolution's generations never ran"
        time.sleep(0.05)
    conn.sock.close()
    conn.close()
    # Its 32 x 200-token first round would run for minutes; cancelled, the engines empty at once.
    deadline = time.time() + 10
    while True:
        text = metrics()
        busy = metric(text, "tandem_running_batch_size") + metric(text, "tandem_queue_depth")
        if busy == 0:
            break
        assert time.time() < deadline, f"{busy} requests still running or waiting after the client left"
        time.sleep(0.1)


run_tests(globals())
