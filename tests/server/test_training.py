"""The official Tinker SDK (and raw HTTP for protocol details) against `tandem serve` with the
training API on a tiny checkpoint. Usage: test_training.py BASE_URL MODEL_NAME.

Checks: an SFT loop lowers the loss; an RL loop (sample from the current weights, reward, group
advantages, importance_sampling) raises the reward; the trainer's logprobs for sampled tokens equal
the sampler's; every loss runs with its options; checkpoints save, list, load (with optimizer) and
delete; out-of-order chunks run in seq_id order; a resubmission gets the same future; bad inputs get
clear errors (category user) and the server keeps serving.
"""
import json
import os
import sys

os.environ.setdefault("TINKER_API_KEY", "tml-tandem-test")
os.environ["TINKER_TELEMETRY"] = "0"

import httpx
import numpy as np
import tinker
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

URL, BASE = sys.argv[1], sys.argv[2]
EXPORT_ROOT = sys.argv[4] if len(sys.argv) > 4 else None  # the server's --export-dir
http = httpx.Client(base_url=URL, timeout=60)


def post(path, body):
    r = http.post(path, json=body)
    return r.status_code, r.json()


def wait(request_id, proto=False):
    headers = {"Accept": "application/x-protobuf"} if proto else {}
    while True:
        r = http.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=headers)
        assert r.status_code == 200, r.text
        if r.headers["content-type"].startswith("application/x-protobuf"):
            return r.content
        body = r.json()
        if body.get("type") != "try_again":
            return body


def datum(tokens):
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


service = tinker.ServiceClient(base_url=URL)
caps = tinker.RestClient(base_url=URL).get_server_capabilities().result()
assert caps.supported_models[0].model_name == BASE and caps.supported_models[0].trainable, caps

# ---------------------------------------------------------------- SFT: the loss falls
tc = service.create_lora_training_client(base_model=BASE, rank=8).result()
info = tc.get_info()
assert info.is_lora and info.lora_rank == 8, info
assert info.model_id.endswith(":train:0"), info.model_id
seqs = [[3 + (i * 7 + j * 5) % 40 for j in range(16)] for i in range(4)]
data = [datum(s) for s in seqs]
losses = []
for step in range(12):
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=2e-2, grad_clip_norm=50.0))
    out, _ = fb.result(), opt.result()
    losses.append(out.metrics["loss:sum"])
    assert len(out.loss_fn_outputs) == 4 and len(out.loss_fn_outputs[0]["logprobs"].data) == 15
print("SFT loss:", [round(x, 2) for x in losses])
assert losses[-1] < 0.5 * losses[0], losses

# ---------------------------------------------------------------- RL: the reward rises
# Reward: the share of sampled tokens in the lowest quarter of the vocabulary. Groups of samples per prompt, advantage =
# reward - group mean, importance_sampling on the sampler's logprobs.
rl = service.create_lora_training_client(base_model=BASE, rank=8, seed=3).result()
prompts = [[11, 12, 13], [20, 21], [30, 31, 32, 33]]
VOCAB_QUARTER = int(sys.argv[3]) // 4 if len(sys.argv) > 3 else 64
rewards, worst_diff = [], 0.0
for step in range(10):
    sampler = rl.save_weights_and_get_sampling_client()
    futures = [
        sampler.sample(types.ModelInput.from_ints(p), num_samples=6,
                       sampling_params=types.SamplingParams(max_tokens=8, temperature=1.0, seed=100 * step + i))
        for i, p in enumerate(prompts)
    ]
    batch, step_rewards = [], []
    for p, f in zip(prompts, futures):
        res = f.result()
        rs = [float(np.mean([t < VOCAB_QUARTER for t in s.tokens])) for s in res.sequences]
        step_rewards += rs
        mean = float(np.mean(rs))
        for s, r in zip(res.sequences, rs):
            assert len(s.logprobs) == len(s.tokens)
            full = p + list(s.tokens)
            n = len(full) - 1
            q = [0.0] * (len(p) - 1) + list(s.logprobs)
            adv = [0.0] * (len(p) - 1) + [r - mean] * len(s.tokens)
            batch.append(types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={"target_tokens": full[1:], "logprobs": q, "advantages": adv},
            ))
    out = rl.forward_backward(batch, "importance_sampling").result()
    # On-policy: the trainer's logprobs of the sampled tokens are the sampler's, bit for bit.
    for d, o in zip(batch, out.loss_fn_outputs):
        q = np.array(d.loss_fn_inputs["logprobs"].data)
        lp = np.array(o["logprobs"].data)
        mask = np.array(d.loss_fn_inputs["advantages"].data) != 0
        if mask.any():
            worst_diff = max(worst_diff, float(np.abs(lp - q)[len(q) - int(mask.sum()):].max()))
    rl.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    rewards.append(float(np.mean(step_rewards)))
print("RL reward:", [round(r, 3) for r in rewards], "max |train lp - sampler lp|:", worst_diff)
assert worst_diff < 1e-5, worst_diff
assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards

# ---------------------------------------------------------------- every loss, with options
for loss, cfg in [("ppo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}), ("cispo", None),
                  ("dro", {"beta": 0.2}), ("importance_sampling", None)]:
    out = rl.forward_backward(batch[:3], loss, cfg).result()
    assert "loss:sum" in out.metrics and np.isfinite(out.metrics["loss:sum"]), (loss, out.metrics)
    assert all(k.count(":") == 1 for k in out.metrics), out.metrics
rl.optim_step(types.AdamParams(learning_rate=1e-4)).result()

# ---------------------------------------------------------------- checkpoints
saved = tc.save_state("ckpt-a").result()
assert saved.path.startswith("tinker://") and saved.path.endswith("/weights/ckpt-a"), saved.path
before = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
tc.forward_backward(data, "cross_entropy").result()
tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
moved = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
assert moved != before
tc.load_state_with_optimizer(saved.path).result()
again = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
assert abs(again - before) < 1e-4, (before, again)
restored = service.create_training_client_from_state_with_optimizer(saved.path).result()
assert abs(restored.forward(data, "cross_entropy").result().metrics["loss:sum"] - before) < 1e-4
sampler_path = tc.save_weights_for_sampler("for-sampling").result().path
assert "/sampler_weights/" in sampler_path
s2 = service.create_sampling_client(model_path=sampler_path)
lp = s2.compute_logprobs(types.ModelInput.from_ints(seqs[0])).result()
assert lp[0] is None and len(lp) == 16
fwd = tc.forward([datum(seqs[0])], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
assert np.abs(np.array(lp[1:]) - np.array(fwd)).max() < 1e-5
if EXPORT_ROOT:
    r = http.post("/tandem/v1/export", json={"path": sampler_path, "name": "merged"})
    assert r.status_code == 200, r.text
    merged = os.path.join(EXPORT_ROOT, "merged")
    assert os.path.realpath(r.json()["out_dir"]) == os.path.realpath(merged), r.json()
    assert os.path.exists(os.path.join(merged, "model.safetensors")), os.listdir(merged)
    cfg = json.load(open(os.path.join(merged, "config.json")))
    assert cfg["tie_word_embeddings"] is False  # the unembedding adapter unties the output
    # Nothing is replaced unless asked; then it is.
    r = http.post("/tandem/v1/export", json={"path": sampler_path, "name": "merged"})
    assert r.status_code == 409 and "overwrite" in r.json()["detail"], r.text
    r = http.post("/tandem/v1/export", json={"path": sampler_path, "name": "merged", "overwrite": True})
    assert r.status_code == 200, r.text
    # A client names a folder; it never gives a path, in any spelling.
    outside = os.path.join(os.path.dirname(os.path.abspath(EXPORT_ROOT)), "outside-export")
    os.makedirs(outside, exist_ok=True)
    for bad in [outside, "/tmp/tandem-escape", "../escape", "..", ".", "a/b", "a\\b", "%2e%2e%2fescape",
                "..%2fescape", "", "x" * 300, "nul\x00byte"]:
        r = http.post("/tandem/v1/export", json={"path": sampler_path, "name": bad})
        assert r.status_code == 400, (bad, r.status_code, r.text)
    for body in [{"path": sampler_path, "out_dir": outside}, {"path": sampler_path},
                 {"path": sampler_path, "name": "ok", "overwrite": "yes"}, {"path": "/etc/passwd", "name": "ok"},
                 {"path": "tinker://../../etc/sampler_weights/x", "name": "ok"}]:
        r = http.post("/tandem/v1/export", json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
    # A symbolic link planted inside the export directory is not written through.
    os.symlink(outside, os.path.join(EXPORT_ROOT, "planted"))
    for overwrite in [False, True]:
        r = http.post("/tandem/v1/export", json={"path": sampler_path, "name": "planted", "overwrite": overwrite})
        assert r.status_code == 400 and "symbolic link" in r.text, r.text
    assert os.listdir(outside) == [], os.listdir(outside)
    assert not os.path.exists("/tmp/tandem-escape") and not os.path.exists(os.path.join(EXPORT_ROOT, "..", "escape"))
info = http.post("/api/v1/weights_info", json={"tinker_path": sampler_path}).json()
assert info["is_lora"] and info["lora_rank"] == 8, info
run = saved.path.split("/")[2]
listing = http.get(f"/api/v1/training_runs/{run}/checkpoints").json()
ids = sorted(c["checkpoint_id"] for c in listing["checkpoints"])
assert ids == ["sampler_weights/for-sampling", "weights/ckpt-a"], ids
assert http.delete(f"/api/v1/training_runs/{run}/checkpoints/weights/ckpt-a").status_code == 204
ids = [c["checkpoint_id"] for c in http.get(f"/api/v1/training_runs/{run}/checkpoints").json()["checkpoints"]]
assert ids == ["sampler_weights/for-sampling"], ids

# ---------------------------------------------------------------- protocol: order and resubmission
# A fresh model over raw HTTP: seq 2 (optim_step) arrives before seq 1 (forward_backward). If it ran
# first it would step with no gradients; in order, the step uses seq 1's gradients.
session = post("/api/v1/create_session", {})[1]["session_id"]
_, r = post("/api/v1/create_model", {"session_id": session, "model_seq_id": 0, "base_model": BASE,
                                     "lora_config": {"rank": 4}})
model_id = wait(r["request_id"])["model_id"]
assert model_id == f"{session}:train:0"


def fb_proto(seq_id, tokens, loss="cross_entropy", target=None, model=None):
    m = pb.ForwardBackwardRequest(model_id=model or model_id, seq_id=seq_id, loss_fn=loss)
    d = m.data.add()
    d.model_input.add().encoded_text.tokens = np.array(tokens[:-1], dtype=np.int32).tobytes()
    tgt = np.array(target if target is not None else tokens[1:], dtype=np.int64)
    d.loss_fn_inputs["target_tokens"].CopyFrom(pb.Tensor(dense=tgt.tobytes(), dtype=pb.DTYPE_INT64, shape=[len(tgt)]))
    return m.SerializeToString()


def send_fb(body):
    r = http.post("/api/v1/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


_, opt = post("/api/v1/optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.05}})
first = send_fb(fb_proto(1, seqs[0]))
assert send_fb(fb_proto(1, seqs[0])) == first, "a resubmitted seq_id must return the same future"
out = pb.ForwardBackwardOutput()
out.ParseFromString(wait(first, proto=True))
assert out.metrics["loss:sum"] > 0 and out.loss_fn_outputs[0].num_datums == 1
step = wait(opt["request_id"])
assert step["metrics"]["grad_norm:max"] > 0, step  # the step saw seq 1's gradients
assert step["metrics"]["num_datums:sum"] == 1, step

# ---------------------------------------------------------------- full fine-tuning (xorl JSON forms)
_, r = post("/api/v1/create_model", {"session_id": session, "model_seq_id": 1, "base_model": BASE})
full_id = wait(r["request_id"])["model_id"]
xorl = {"model_id": full_id, "seq_id": 1, "forward_backward_input": {
    "data": [{"model_input": {"input_ids": seqs[1][:-1]},
              "loss_fn_inputs": {"target_tokens": {"data": seqs[1][1:], "dtype": "int64", "shape": [15]}}}],
    "loss_fn": "cross_entropy", "loss_fn_params": {}}}
first_loss = wait(post("/api/v1/forward_backward", xorl)[1]["request_id"])["metrics"]["loss:sum"]
wait(post("/api/v1/optim_step", {"model_id": full_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-2}})[1]["request_id"])
xorl["seq_id"] = 3
second_loss = wait(post("/api/v1/forward", xorl)[1]["request_id"])["metrics"]["loss:sum"]
assert second_loss < first_loss, (first_loss, second_loss)
# The server holds one full-weight model at a time by default (--max-full-models): a second is
# refused before any memory is taken, and fits once the first is unloaded.
code, r = post("/api/v1/create_model", {"session_id": session, "model_seq_id": 2, "base_model": BASE})
refused = wait(r["request_id"]) if code == 200 else r
assert "--max-full-models" in json.dumps(refused), refused
assert post("/api/v1/unload_model", {"model_id": full_id})[0] == 200
_, r = post("/api/v1/create_model", {"session_id": session, "model_seq_id": 3, "base_model": BASE})
full_id = wait(r["request_id"])["model_id"]
assert post("/api/v1/unload_model", {"model_id": full_id})[0] == 200

# ---------------------------------------------------------------- bad inputs: clear errors
def expect_error(fn, needle):
    try:
        fn()
    except tinker.RequestFailedError as e:
        assert needle in str(e), (needle, str(e))
        assert e.category == types.RequestErrorCategory.User, e.category
        return
    raise AssertionError(f"no error; expected {needle}")


bad_shape = types.Datum(model_input=types.ModelInput.from_ints(seqs[0][:-1]),
                        loss_fn_inputs={"target_tokens": seqs[0][1:5], "weights": [1.0] * 4})
expect_error(lambda: tc.forward_backward([bad_shape], "cross_entropy").result(), "target_tokens has 4 entries")
expect_error(lambda: tc.forward_backward(data, "reinforce").result(), "unknown loss_fn `reinforce`")
out_of_range = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 10**7]),
                           loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0] * 3})
expect_error(lambda: tc.forward_backward([out_of_range], "cross_entropy").result(), "outside the vocabulary")
expect_error(lambda: tc.forward_backward(data, "importance_sampling").result(), "needs input `logprobs`")
expect_error(lambda: tc.forward_backward(data, "ppo", {"clip": 0.2}).result(), "takes no option `clip`")
# Numeric options are checked, never replaced by defaults or let through to overflow.
expect_error(lambda: tc.optim_step(types.AdamParams(learning_rate=1e30)).result(), "learning_rate must be in")
huge = types.Datum(model_input=types.ModelInput.from_ints(seqs[0][:-1]),
                   loss_fn_inputs={"target_tokens": seqs[0][1:], "weights": [1e38] * (len(seqs[0]) - 1)})
expect_error(lambda: tc.forward_backward([huge], "cross_entropy").result(), "beyond")
code, body = post("/api/v1/optim_step", {"model_id": tc.get_info().model_id, "seq_id": 10**6,
                                         "adam_params": {"learning_rate": "x"}})
assert code == 400 and "adam_params.learning_rate" in body["detail"], (code, body)
r = http.post("/api/v1/forward_backward", content=fb_proto(99, seqs[0], model="nobody:train:0"),
              headers={"Content-Type": "application/x-protobuf"})
failed = wait(r.json()["request_id"])
assert failed["category"] == "user" and "unknown model_id" in failed["error"], failed
assert http.post("/api/v1/forward_backward", content=b"\xff\xff", headers={"Content-Type": "application/x-protobuf"}).status_code == 400
code, body = post("/api/v1/asample", {"sampling_session_id": "nope", "prompt": {"chunks": []}})
assert code == 400 and "unknown sampling_session_id" in body["detail"], body
# The model still trains after errors, and the OpenAI API still serves.
assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] > 0
r = http.post("/v1/completions", json={"model": BASE, "prompt": "hello", "max_tokens": 4})
assert r.status_code == 200, r.text
# Training work is charged to the session's client in the scheduling policy, beside its sampling.
import re
metrics = http.get("/metrics").text
trained = {m[0]: int(m[1]) for m in re.findall(r'tandem_client_service_tokens_total\{client="(tinker:[^"]+)",kind="train"\} (\d+)', metrics)}
sampled = {m[0]: int(m[1]) for m in re.findall(r'tandem_client_service_tokens_total\{client="(tinker:[^"]+)",kind="output"\} (\d+)', metrics)}
assert any(n > 0 for n in trained.values()), trained
assert any(trained.get(c, 0) > 0 and sampled.get(c, 0) > 0 for c in trained), (trained, sampled)
# A sample with num_samples = 8 prefills its prompt once: the other seven start on its KV blocks
# (counted by the server's prefix-cache hits; the prompt's two full blocks, 32 tokens, each).
def prefix_hits():
    return int(re.search(r"^tandem_prefix_cache_hit_tokens_total (\d+)", http.get("/metrics").text, re.M).group(1))
prompt = [(7 * i) % 200 + 3 for i in range(40)]
before = prefix_hits()
group = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=8,
                       sampling_params=types.SamplingParams(max_tokens=4, temperature=1.0, seed=5)).result()
assert len(group.sequences) == 8
assert prefix_hits() - before >= 7 * 32, (before, prefix_hits())
print("training API: all checks passed")
