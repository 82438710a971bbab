"""`tandem serve --api-key ... --training-api-key ... --admin-api-key ...`: every route but /health
refuses requests without a key that reaches it, the key (never a header) names the client, keys
never reach /metrics, and idle or trickling connections are closed. Run by
crates/tandem/tests/server.rs against a freshly started server.

usage: python3 test_auth.py BASE_URL MODEL_NAME SERVE_KEY TRAIN_KEY ADMIN_KEY IDLE_TIMEOUT_S REQUEST_TIMEOUT_S
"""
import http.client
import json
import socket
import sys
import time
import urllib.parse

import openai
from harness import run_tests

BASE, MODEL, SERVE, TRAIN, ADMIN, IDLE, REQUEST = sys.argv[1:8]
IDLE, REQUEST = float(IDLE), float(REQUEST)
HOST = urllib.parse.urlparse(BASE)

# (method, path, body): one route of each kind, plus one that does not exist.
ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("GET", "/metrics", None),
    ("POST", "/tokenize", {"prompt": "Hi"}),
    ("GET", "/nope", None),
    ("GET", "/api/v1/healthz", None),
    ("GET", "/api/v1/get_server_capabilities", None),
    ("POST", "/api/v1/create_session", {"tags": [], "user_metadata": {}, "sdk_version": "x"}),
    ("POST", "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}),
    ("POST", "/tandem/v1/export", {"path": "tinker://none/weights/none", "name": "x"}),
]
SCOPE = {"/tandem/v1/export": "admin", "/generate": "train"}


def scope(path):
    return SCOPE.get(path, "train" if path.startswith("/api/v1/") else "serve")


def raw(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data, {k.lower(): v for k, v in r.getheaders()}


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_health_is_open():
    assert raw("GET", "/health")[0] == 200


def test_no_key_or_a_wrong_key_is_401_on_every_route():
    for method, path, body in ROUTES:
        for headers in ({}, bearer("sk-not-a-key-at-all"), {"X-API-Key": "sk-not-a-key-at-all"}, {"Authorization": "Basic xyz"}):
            status, data, h = raw(method, path, body, headers)
            assert status == 401, (path, headers, status, data)
            assert h.get("www-authenticate") == "Bearer", (path, h)
            err = json.loads(data)["error"]
            assert err["type"] == "authentication_error" and err["message"], err


def test_each_key_reaches_its_routes_only():
    reach = {SERVE: {"serve"}, TRAIN: {"serve", "train"}, ADMIN: {"serve", "train", "admin"}}
    for key, scopes in reach.items():
        for method, path, body in ROUTES:
            for headers in (bearer(key), {"X-API-Key": key}):
                status, data, _ = raw(method, path, body, headers)
                if scope(path) in scopes:
                    assert status not in (401, 403), (path, status, data)
                else:
                    assert status == 403, (path, status, data)
                    assert json.loads(data)["error"]["type"] == "permission_error"


def test_the_openai_client_with_a_key():
    client = openai.OpenAI(base_url=BASE + "/v1", api_key=SERVE, max_retries=0, timeout=60)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name the capital of France."}],
                                       temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content, r
    bad = openai.OpenAI(base_url=BASE + "/v1", api_key="sk-wrong-key-123", max_retries=0, timeout=60)
    try:
        bad.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass


def test_the_key_is_the_client_and_a_header_cannot_impersonate():
    body = {"prompt": "Count: one two three", "max_tokens": 4, "temperature": 0}
    status, _, _ = raw("POST", "/v1/completions", body, {**bearer(SERVE), "X-Tandem-Client": "victim"})
    assert status == 200
    text = raw("GET", "/metrics", None, bearer(ADMIN))[1].decode()
    assert 'client="victim"' not in text, "a header named another client"
    assert 'client="key-' in text and "/victim" in text, "the header should name an agent within the key's client"
    for key in (SERVE, TRAIN, ADMIN):
        assert key not in text, "a key reached /metrics"


def read_until_closed(sock, limit_s):
    """Seconds until the server closes the connection (None if it stays open past limit_s)."""
    sock.settimeout(limit_s)
    start = time.time()
    try:
        while sock.recv(4096):
            pass
        return time.time() - start
    except socket.timeout:
        return None
    except ConnectionResetError:
        return time.time() - start


def test_idle_and_trickling_connections_are_closed():
    # A connection that never sends a request.
    with socket.create_connection((HOST.hostname, HOST.port)) as s:
        waited = read_until_closed(s, IDLE + 10)
        assert waited is not None and waited < IDLE + 5, waited
    # A request's headers sent one line at a time, slower than the timeout allows in total.
    with socket.create_connection((HOST.hostname, HOST.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.time()
        closed = False
        for i in range(int(IDLE * 4) + 8):
            time.sleep(0.5)
            try:
                s.sendall(f"X-Slow-{i}: 1\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed and time.time() - start < IDLE + 5, "the trickling client was not cut off"
    # A kept-alive connection idle after its answer.
    conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=60)
    conn.request("GET", "/health")
    assert conn.getresponse().read()
    waited = read_until_closed(conn.sock, IDLE + 10)
    assert waited is not None and waited < IDLE + 5, waited
    # And the server still answers.
    assert raw("GET", "/health")[0] == 200


def test_slow_requests_get_408_and_streams_run_on():
    # A non-streaming generation longer than the request timeout: 408, and it is cancelled.
    start = time.time()
    body = {"prompt": "Count to one thousand:", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    status, data, _ = raw("POST", "/v1/completions", body, bearer(SERVE))
    assert status == 408 and "request-timeout" in json.loads(data)["error"]["message"], (status, data)
    assert time.time() - start < REQUEST + 5
    for _ in range(50):
        if "tandem_running_batch_size 0" in raw("GET", "/metrics", None, bearer(SERVE))[1].decode():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the timed-out generation was not cancelled")
    # A body that trickles in: 408.
    with socket.create_connection((HOST.hostname, HOST.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + SERVE.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        s.settimeout(REQUEST + 10)
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    # A stream that runs past the timeout is not cut: it started in time.
    client = openai.OpenAI(base_url=BASE + "/v1", api_key=SERVE, max_retries=0, timeout=120)
    start, chunks, finish = time.time(), 0, None
    for chunk in client.completions.create(model=MODEL, prompt="Count to one thousand:", max_tokens=2000,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}):
        chunks += 1
        finish = chunk.choices[0].finish_reason or finish
        if time.time() - start > REQUEST + 2 and finish is None and chunks > 10:
            break
    assert time.time() - start > REQUEST + 1, "the stream ended before the request timeout: test too short"
    assert chunks > 10


if __name__ == "__main__":
    run_tests(globals())
