"""The training API's resource limits on a server started with small ones
(`--max-session-models 1 --max-pending-requests 2 --max-samplers 2 --training-disk 2000
--session-timeout 3`):
each refusal names its flag, nothing is taken before it, and the server goes on. Raw HTTP in the
Tinker SDK's JSON forms. Run by crates/tandem/tests/server.rs.

usage: python3 test_limits.py BASE_URL MODEL_NAME
"""
import sys
import time

import httpx
from harness import run_tests

URL, BASE = sys.argv[1], sys.argv[2]
http = httpx.Client(base_url=URL, timeout=60)
SEQ = [3 + (j * 5) % 40 for j in range(16)]


def post(path, body):
    r = http.post(path, json=body)
    return r.status_code, r.json()


def wait(request_id):
    while True:
        r = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
        assert r.status_code == 200, r.text
        body = r.json()
        if body.get("type") != "try_again":
            return body


def outcome(code_body):
    """A request's result: its future's outcome, or the error it was refused with at once."""
    code, body = code_body
    return wait(body["request_id"]) if code == 200 and "request_id" in body else {"status": code, **body}


def new_model(session, seq):
    return outcome(post("/api/v1/create_model", {"session_id": session, "model_seq_id": seq, "base_model": BASE,
                                                 "lora_config": {"rank": 4}}))


def fb(model_id, seq):
    return {"model_id": model_id, "seq_id": seq, "forward_backward_input": {
        "data": [{"model_input": {"input_ids": SEQ[:-1]},
                  "loss_fn_inputs": {"target_tokens": {"data": SEQ[1:], "dtype": "int64", "shape": [15]}}}],
        "loss_fn": "cross_entropy", "loss_fn_params": {}}}


def test_models_per_session_pending_requests_and_disk():
    session = post("/api/v1/create_session", {})[1]["session_id"]
    model_id = new_model(session, 0)["model_id"]
    refused = new_model(session, 1)
    assert "--max-session-models" in str(refused), refused
    # A second session has its own allowance.
    other = post("/api/v1/create_session", {})[1]["session_id"]
    assert new_model(other, 0)["model_id"] == f"{other}:train:0"
    # Checkpoints past --training-disk are refused before anything is written.
    saved = outcome(post("/api/v1/save_weights", {"model_id": model_id, "seq_id": 1, "path": "too-big"}))
    assert "--training-disk" in str(saved), saved
    # Requests queued behind a missing seq_id stay pending; beyond the limit: 429, then room again.
    assert post("/api/v1/forward_backward", fb(model_id, 4))[0] == 200
    assert post("/api/v1/forward_backward", fb(model_id, 5))[0] == 200
    code, body = post("/api/v1/forward_backward", fb(model_id, 6))
    assert code == 429 and "--max-pending-requests" in str(body), (code, body)
    assert post("/api/v1/unload_model", {"model_id": model_id})[0] == 200  # drops its queued requests
    fresh = post("/api/v1/create_session", {})[1]["session_id"]
    fresh_model = new_model(fresh, 0)["model_id"]
    done = outcome(post("/api/v1/forward_backward", fb(fresh_model, 1)))
    assert "loss:sum" in str(done), done


def test_samplers_beyond_the_limit_are_dropped_least_recently_used_first():
    session = post("/api/v1/create_session", {})[1]["session_id"]
    def sampler():
        code, body = post("/api/v1/create_sampling_session", {"session_id": session, "base_model": BASE})
        assert code == 200, body
        return body["sampling_session_id"]
    def sample(sid):
        return post("/api/v1/asample", {"sampling_session_id": sid, "prompt": {"input_ids": SEQ[:4]},
                                        "sampling_params": {"max_tokens": 2}})
    def sampled(sid):
        # Each sample is waited for: the server allows only 2 pending requests, and on a busy
        # machine a sample not yet finished would count against the next.
        code, body = sample(sid)
        assert code == 200, (code, body)
        return outcome((code, body))
    a, b = sampler(), sampler()
    sampled(a)  # a is now the most recently used
    c = sampler()  # drops b
    code, body = sample(b)
    assert code == 400 and "--max-samplers" in str(body), (code, body)
    sampled(a)
    sampled(c)


def test_sessions_without_a_sign_of_life_end():
    session = post("/api/v1/create_session", {})[1]["session_id"]
    model_id = new_model(session, 0)["model_id"]
    kept = post("/api/v1/create_session", {})[1]["session_id"]
    for _ in range(10):  # 5 s: past the 3 s timeout for one session, heartbeats keep the other
        time.sleep(0.5)
        assert post("/api/v1/session_heartbeat", {"session_id": kept})[0] == 200
    code, body = post("/api/v1/session_heartbeat", {"session_id": session})
    assert code == 400 and "unknown session_id" in str(body), (code, body)
    gone = outcome(post("/api/v1/forward_backward", fb(model_id, 1)))
    assert "unknown model_id" in str(gone), gone
    # The kept session still creates models.
    assert new_model(kept, 0)["model_id"] == f"{kept}:train:0"


if __name__ == "__main__":
    run_tests(globals())
