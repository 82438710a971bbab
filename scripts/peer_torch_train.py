#!/usr/bin/env python3
"""PyTorch peer for `tandem bench train`: the same decoder (Llama/Qwen2 family) written plainly in
PyTorch, LoRA adapters (PEFT-style: a ~ uniform, b = 0, scale alpha/rank) on the same projections,
timed on the same data: forward_backward (cross-entropy, summed) tokens/s for LoRA and full weights,
and the optimizer step after it (torch.optim.AdamW).

Usage: peer_torch_train.py DIR --mode lora|full --rank R --alpha A --batch B --seq-len L --reps N
DIR holds model.safetensors (Hugging Face names) and tandem_config.json. Prints JSON on stdout.
Also prints the summed loss of the first repetition so tandem can check it computes the same.
"""
import argparse
import json
import math
import statistics
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
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
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


times, loss0, peak = [], None, None
for r in range(a.reps + 1):
    if r == 0:
        # The peak one forward_backward adds (Linux resets the peak with clear_refs 5).
        try:
            open("/proc/self/clear_refs", "w").write("5")
            before = status_mib("VmRSS:")
        except OSError:
            before = None
    t0 = time.time()
    logits = forward(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    if r == 0:
        loss0 = loss.item()
        if before is not None:
            peak = max(0.0, status_mib("VmHWM:") - before)
    else:
        times.append(time.time() - t0)
    for prm in list(params.values()) + [x for ab in lora.values() for x in ab]:
        prm.grad = None
secs = statistics.median(times)

# The optimizer step a training loop takes after each forward_backward: torch.optim.AdamW as a user
# builds it (defaults), timed on its second step (the first creates its state).
trainable = list({id(p): p for p in list(params.values()) + [x for ab in lora.values() for x in ab]
                  if p.requires_grad}.values())
opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
for r in range(2):
    logits = forward(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum").backward()
    t0 = time.time()
    opt.step()
    step_secs = time.time() - t0
    opt.zero_grad(set_to_none=True)
json.dump({"mode": a.mode, "tokens_per_s": a.batch * a.seq_len / secs, "secs": secs, "loss_sum": loss0, "peak_mib": peak,
           "optim_step_secs": step_secs,
           "torch": torch.__version__, "threads": torch.get_num_threads()}, sys.stdout)
