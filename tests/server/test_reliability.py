"""The reliability suite: bad input on both APIs (each case's precise status and message, then a
normal request answered exactly as before), load with disconnecting clients, training during
serving, and a maximal-length training datum whose memory stays under the server's budget. Run by
crates/tandem/tests/server.rs against `tandem serve` on SmolLM2 with a 512-token context.

usage: python3 test_reliability.py BASE_URL MODEL_NAME SERVER_PID TRAINING_MEMORY_BYTES
"""
import concurrent.futures
import http.client
import json
import random
import socket
import sys
import threading
import time
import urllib.parse

from harness import run_tests

BASE, MODEL, PID, BUDGET = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
HOST = urllib.parse.urlparse(BASE)
CONTEXT = 512


def raw(method, path, body=None, headers=None, timeout=300):
    conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered (413) and closed before reading an oversized body
    r = conn.getresponse()
    out = r.read()
    conn.close()
    return r.status, out


def normal():
    """A greedy completion: what every bad request must leave unchanged."""
    status, data = raw("POST", "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8,
                                                   "temperature": 0})
    assert status == 200, data
    return json.loads(data)["choices"][0]["text"]


REFERENCE = normal()


def wait(request_id):
    while True:
        status, data = raw("POST", "/api/v1/retrieve_future", {"request_id": request_id})
        assert status == 200, data
        body = json.loads(data)
        if body.get("type") != "try_again":
            return body


def session():
    return json.loads(raw("POST", "/api/v1/create_session", {})[1])["session_id"]


def lora_model():
    s = session()
    status, data = raw("POST", "/api/v1/create_model", {"session_id": s, "model_seq_id": 0, "base_model": MODEL,
                                                        "lora_config": {"rank": 4}})
    assert status == 200, data
    return wait(json.loads(data)["request_id"])["model_id"]


MODEL_ID = lora_model()
SEQ = iter(range(1, 10**6))
TOKENS = [3 + (j * 5) % 40 for j in range(16)]


def fb(tokens=TOKENS, targets=None, loss="cross_entropy", weights=None, extra=None, seq=None):
    targets = tokens[1:] if targets is None else targets
    inputs = {"target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]}}
    if weights is not None:
        inputs["weights"] = {"data": weights, "dtype": "float32", "shape": [len(weights)]}
    return {"model_id": MODEL_ID, "seq_id": next(SEQ) if seq is None else seq, "forward_backward_input": {
        "data": [{"model_input": {"input_ids": tokens[:-1]}, "loss_fn_inputs": inputs}],
        "loss_fn": loss, "loss_fn_params": extra or {}}}


def opt(seq=None, **adam):
    """An optim_step; requests refused before queueing take a seq_id no request waits for."""
    return {"model_id": MODEL_ID, "seq_id": next(SEQ) if seq is None else seq, "adam_params": adam}


def completion(**fields):
    return {"prompt": "hi", "max_tokens": 4, **fields}


def chat(**fields):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


LONG = "word " * 2000
FUTURE = "future"  # a Tinker request accepted, whose future fails with category user
C, CH = "/v1/completions", "/v1/chat/completions"
# (name, method, path, body (lambda: built when run), expected status or FUTURE, text in the error)
CASES = [
    # OpenAI completions
    ("truncated json", "POST", C, lambda: b'{"prompt": "hi", "max_tok', 400, ""),
    ("invalid utf-8", "POST", C, lambda: b'{"prompt": "\xff\xfe bad"}', 400, ""),
    ("not an object", "POST", C, lambda: b"[1, 2, 3]", 400, ""),
    ("empty body", "POST", C, lambda: b"", 400, ""),
    ("10 MB body", "POST", C, lambda: b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}', 413, ""),
    ("missing prompt", "POST", C, lambda: {"max_tokens": 3}, 400, "prompt"),
    ("prompt a number", "POST", C, lambda: {"prompt": 5}, 400, "prompt"),
    ("max_tokens a string", "POST", C, lambda: completion(max_tokens="ten"), 400, "max_tokens"),
    ("negative max_tokens", "POST", C, lambda: completion(max_tokens=-3), 400, "max_tokens"),
    ("huge max_tokens", "POST", C, lambda: completion(max_tokens=10**12), 400, "max_tokens"),
    ("n zero", "POST", C, lambda: completion(n=0), 400, "n"),
    ("n huge", "POST", C, lambda: completion(n=1000), 400, "n"),
    ("negative temperature", "POST", C, lambda: completion(temperature=-1), 400, "temperature"),
    ("temperature above 2", "POST", C, lambda: completion(temperature=3), 400, "temperature"),
    ("temperature a string", "POST", C, lambda: completion(temperature="hot"), 400, "temperature"),
    ("top_p zero", "POST", C, lambda: completion(top_p=0), 400, "top_p"),
    ("top_p above 1", "POST", C, lambda: completion(top_p=1.5), 400, "top_p"),
    ("top_k negative", "POST", C, lambda: completion(top_k=-5), 400, "top_k"),
    ("min_p above 1", "POST", C, lambda: completion(min_p=2), 400, "min_p"),
    ("repetition_penalty zero", "POST", C, lambda: completion(repetition_penalty=0), 400, "repetition_penalty"),
    ("logprobs 50", "POST", C, lambda: completion(logprobs=50), 400, "logprobs"),
    ("logit_bias key not an id", "POST", C, lambda: completion(logit_bias={"abc": 5}), 400, "logit_bias"),
    ("logit_bias above 100", "POST", C, lambda: completion(logit_bias={"50": 101}), 400, "logit_bias"),
    ("logit_bias past the vocabulary", "POST", C, lambda: completion(logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("presence_penalty above 2", "POST", C, lambda: completion(presence_penalty=2.5), 400, "presence_penalty"),
    ("frequency_penalty a string", "POST", C, lambda: completion(frequency_penalty="x"), 400, "frequency_penalty"),
    ("min_tokens negative", "POST", C, lambda: completion(min_tokens=-1), 400, "min_tokens"),
    ("min_tokens above max_tokens", "POST", C, lambda: completion(min_tokens=10, max_tokens=5), 400, "min_tokens"),
    ("best_of", "POST", C, lambda: completion(best_of=3), 400, "best_of"),
    ("suffix", "POST", C, lambda: completion(suffix="end"), 400, "suffix"),
    ("response_format yaml", "POST", C, lambda: completion(response_format={"type": "yaml"}), 400, "response_format"),
    ("guided_json not a schema", "POST", C, lambda: completion(guided_json=[1, 2]), 400, "guided_json"),
    ("guided_regex unbalanced", "POST", C, lambda: completion(guided_regex="(a"), 400, "guided_regex"),
    ("unknown model", "POST", C, lambda: completion(model="gpt-17"), 404, "gpt-17"),
    ("token ids past the vocabulary", "POST", C, lambda: {"prompt": [99999999], "max_tokens": 2}, 400, ""),
    ("prompt longer than the context", "POST", C, lambda: completion(prompt=LONG), 400, "context"),
    ("stop a number", "POST", C, lambda: completion(stop=5), 400, "stop"),
    ("stream a string", "POST", C, lambda: completion(stream="yes"), 400, "stream"),
    ("negative seed", "POST", C, lambda: completion(seed=-1), 400, "seed"),
    ("echo a number", "POST", C, lambda: completion(echo=3), 400, "echo"),
    # OpenAI chat
    ("empty messages", "POST", CH, lambda: chat(messages=[]), 400, "messages"),
    ("unknown role", "POST", CH, lambda: chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
    ("messages not a list", "POST", CH, lambda: chat(messages="hi"), 400, "messages"),
    ("message without content", "POST", CH, lambda: chat(messages=[{"role": "user"}]), 400, "content"),
    ("a tool without a name", "POST", CH, lambda: chat(tools=[{"type": "function", "function": {}}]), 400, "tools"),
    ("tool_choice naming no tool", "POST", CH,
     lambda: chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function", "function": {"name": "g"}}),
     400, "tool_choice"),
    ("functions (the legacy form)", "POST", CH, lambda: chat(functions=[{"name": "f"}]), 400, "functions"),
    ("chat prompt longer than the context", "POST", CH,
     lambda: chat(messages=[{"role": "user", "content": LONG}]), 400, "context"),
    # Routes and methods
    ("unknown route", "GET", "/no/such/route", lambda: None, 404, ""),
    ("GET on a POST route", "GET", C, lambda: None, 405, ""),
    ("POST on a GET route", "POST", "/v1/models", lambda: {}, 405, ""),
    # Tinker: sessions and models
    ("create_model in an unknown session", "POST", "/api/v1/create_model",
     lambda: {"session_id": "nope", "model_seq_id": 0, "base_model": MODEL}, FUTURE, "unknown session_id"),
    ("create_model of another base model", "POST", "/api/v1/create_model",
     lambda: {"session_id": session(), "model_seq_id": 0, "base_model": "llama-70b", "lora_config": {"rank": 4}},
     FUTURE, "not served here"),
    ("create_model with LoRA rank 0", "POST", "/api/v1/create_model",
     lambda: {"session_id": session(), "model_seq_id": 0, "base_model": MODEL, "lora_config": {"rank": 0}},
     FUTURE, "rank"),
    ("create_session not JSON", "POST", "/api/v1/create_session", lambda: b"[1", 400, ""),
    ("heartbeat of an unknown session", "POST", "/api/v1/session_heartbeat", lambda: {"session_id": "nope"},
     400, "unknown session_id"),
    ("get_info of an unknown model", "POST", "/api/v1/get_info", lambda: {"model_id": "nobody:train:0"}, 400,
     "unknown model_id"),
    ("unload an unknown model", "POST", "/api/v1/unload_model", lambda: {"model_id": "nobody:train:0"}, 400,
     "unknown model_id"),
    # Tinker: training inputs
    ("forward_backward on an unknown model", "POST", "/api/v1/forward_backward",
     lambda: {**fb(seq=1), "model_id": "nobody:train:0"}, FUTURE, "unknown model_id"),
    ("forward_backward garbage protobuf", "POST", "/api/v1/forward_backward", lambda: b"\xff\xff", 400, ""),
    ("targets of another length", "POST", "/api/v1/forward_backward", lambda: fb(targets=TOKENS[1:5]), FUTURE,
     "target_tokens has 4 entries"),
    ("unknown loss", "POST", "/api/v1/forward_backward", lambda: fb(loss="reinforce"), FUTURE, "unknown loss_fn"),
    ("token past the vocabulary", "POST", "/api/v1/forward_backward", lambda: fb(tokens=[1, 2, 10**7, 4]), FUTURE,
     "outside the vocabulary"),
    ("importance_sampling without logprobs", "POST", "/api/v1/forward_backward",
     lambda: fb(loss="importance_sampling"), FUTURE, "needs input `logprobs`"),
    ("loss weights of 1e38", "POST", "/api/v1/forward_backward", lambda: fb(weights=[1e38] * 15), FUTURE, "beyond"),
    ("datum longer than the context", "POST", "/api/v1/forward_backward",
     lambda: fb(tokens=[5 + i % 50 for i in range(CONTEXT + 50)]), FUTURE, "context"),
    ("unknown loss option", "POST", "/api/v1/forward_backward", lambda: fb(loss="ppo", extra={"clip": 0.2}),
     FUTURE, "takes no option"),
    ("learning rate a string", "POST", "/api/v1/optim_step", lambda: opt(seq=10**9, learning_rate="x"), 400,
     "adam_params.learning_rate"),
    ("learning rate 1e30", "POST", "/api/v1/optim_step", lambda: opt(learning_rate=1e30), FUTURE,
     "learning_rate must be in"),
    ("beta1 above 1", "POST", "/api/v1/optim_step", lambda: opt(learning_rate=1e-3, beta1=2.0), FUTURE, "beta1"),
    # Tinker: sampling, checkpoints, futures
    ("asample from an unknown session", "POST", "/api/v1/asample",
     lambda: {"sampling_session_id": "nope", "prompt": {"chunks": []}}, 400, "unknown sampling_session_id"),
    ("asample temperature a string", "POST", "/api/v1/asample",
     lambda: {"base_model": MODEL, "prompt": {"input_ids": TOKENS[:4]}, "sampling_params": {"temperature": "hot"}},
     400, "sampling_params.temperature"),
    ("asample temperature 5", "POST", "/api/v1/asample",
     lambda: {"base_model": MODEL, "prompt": {"input_ids": TOKENS[:4]}, "sampling_params": {"temperature": 5}},
     400, "temperature"),
    ("save under a path", "POST", "/api/v1/save_weights",
     lambda: {"model_id": MODEL_ID, "seq_id": next(SEQ), "path": "../escape"}, FUTURE, "not a valid name"),
    ("load a checkpoint that does not exist", "POST", "/api/v1/load_weights",
     lambda: {"model_id": MODEL_ID, "seq_id": next(SEQ), "path": "tinker://none/weights/none"}, FUTURE, ""),
    ("weights_info of a bad path", "POST", "/api/v1/weights_info", lambda: {"tinker_path": "/etc/passwd"}, 400,
     "tinker://"),
    ("retrieve an unknown future", "POST", "/api/v1/retrieve_future", lambda: {"request_id": "req-nope"}, 404, ""),
    ("export under a path", "POST", "/tandem/v1/export",
     lambda: {"path": "tinker://none/sampler_weights/none", "name": "../x"}, 400, "name"),
]


def test_every_bad_request_gets_its_error_and_changes_nothing():
    assert len(CASES) >= 60, len(CASES)
    failures = []
    for name, method, path, body, expected, needle in CASES:
        status, data = raw(method, path, body())
        text = data.decode(errors="replace")
        if expected == FUTURE:
            ok = status == 200 and "request_id" in text
            if ok:
                outcome = wait(json.loads(data)["request_id"])
                ok = outcome.get("category") == "user" and needle in outcome.get("error", "")
                text = json.dumps(outcome)
        else:
            ok = status == expected and (needle in text) and (status in (405,) or "error" in text or "detail" in text)
        if not ok:
            failures.append(f"{name}: got {status} {text[:200]}")
        after = normal()
        if after != REFERENCE:
            failures.append(f"{name}: the next normal answer changed: {after!r} vs {REFERENCE!r}")
    assert not failures, "\n".join(failures)


def stream_tokens(prompt, max_tokens, disconnect_after=None):
    """Streams a greedy completion; with disconnect_after, hangs up after that many events."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    s = socket.create_connection((HOST.hostname, HOST.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received, events = b"", 0
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        received += chunk
        events = received.count(b"data: {")
        if disconnect_after is not None and events >= disconnect_after:
            s.close()
            return None
    s.close()
    text = ""
    for line in received.split(b"\n"):
        if line.startswith(b"data: {"):
            text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_load_with_disconnects_equals_solo():
    prompts = [f"List {i} colors:" for i in range(16)]
    solo = {p: stream_tokens(p, 24) for p in prompts[:4]}
    rng = random.Random(7)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        jobs = []
        for i, p in enumerate(prompts * 2):
            drop = rng.random() < 1 / 3
            jobs.append((p, drop, pool.submit(stream_tokens, p, 24, rng.randint(1, 10) if drop else None)))
        for p, drop, job in jobs:
            out = job.result()
            if not drop and p in solo:
                assert out == solo[p], (p, out, solo[p])
    for _ in range(100):
        if "tandem_running_batch_size 0" in raw("GET", "/metrics")[1].decode():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("disconnected streams were not cancelled")
    assert normal() == REFERENCE


def test_training_while_serving_changes_no_answer():
    stop = threading.Event()
    losses = []

    def train():
        while not stop.is_set():
            out = wait(json.loads(raw("POST", "/api/v1/forward_backward", fb())[1])["request_id"])
            losses.append(out["metrics"]["loss:sum"])
            wait(json.loads(raw("POST", "/api/v1/optim_step", opt(learning_rate=1e-3))[1])["request_id"])

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        answers = [normal() for _ in range(15)]
    finally:
        stop.set()
        trainer.join()
    assert losses, "no training step ran during serving"
    assert all(a == REFERENCE for a in answers), answers


def peak_rss():
    """The process's peak resident memory since the last reset."""
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def current_rss():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_maximal_training_datum_stays_under_the_memory_budget():
    open(f"/proc/{PID}/clear_refs", "w").write("5")  # restart the peak (VmHWM) from now
    before = current_rss()
    tokens = [5 + (i * 7) % 50 for i in range(CONTEXT)]  # the longest datum the context holds
    out = wait(json.loads(raw("POST", "/api/v1/forward_backward", fb(tokens=tokens))[1])["request_id"])
    assert "loss:sum" in json.dumps(out), out
    grew = peak_rss() - before
    print(f"maximal datum ({CONTEXT - 1} tokens): peak RSS grew {grew / 2**20:.0f} MiB, budget {BUDGET / 2**20:.0f} MiB")
    assert grew <= BUDGET, (grew, BUDGET)
    assert normal() == REFERENCE


if __name__ == "__main__":
    run_tests(globals())
