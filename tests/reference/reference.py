"""Independent reference forward pass for tandem's numerics tests, in float64 numpy.

It reads the same checkpoint tandem reads (an HF folder of safetensors, or a GGUF file, dequantized
with the `gguf` package's own numpy code) and writes the logits of every position of a token
sequence to an .npy file. Nothing here is shared with the Rust implementation.

usage: python3 reference.py CHECKPOINT TOKENS(comma separated) OUT.npy [KV_DTYPE]

KV_DTYPE f16: keys (after rope) and values rounded to IEEE half precision, as a KV cache of f16
holds them (numpy's own rounding); in a latent (CARE) checkpoint the key and value latents are
what is rounded, before their expansion. Everything else stays float64.
"""
import glob
import json
import os
import struct
import sys

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif dt == "F16":
            arr = np.frombuffer(raw, dtype="<f2")
        elif dt == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"dtype {dt}")
        out[name] = arr.astype(np.float64).reshape(info["shape"])
    return out


def load_hf(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    tensors = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(read_safetensors(f))
    arch = cfg["model_type"]
    heads = cfg["num_attention_heads"]
    p = dict(
        layers=cfg["num_hidden_layers"], heads=heads, kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim", cfg["hidden_size"] // heads), eps=cfg["rms_norm_eps"],
        theta=cfg.get("rope_theta", 10000.0), interleaved=False, qk_norm=arch == "qwen3",
    )
    # A latent (CARE-converted) checkpoint: k = (h·k_aᵀ)·k_bᵀ + bias, likewise v. The reference
    # multiplies the factors back into one projection (float64), not tandem's way.
    latent = "latent_kv" in cfg and cfg["latent_kv"] is not None
    get = lambda n: tensors.get(n)
    W = {
        "embed": get("model.embed_tokens.weight"), "norm": get("model.norm.weight"),
        "lm_head": get("lm_head.weight") if not cfg.get("tie_word_embeddings") else get("model.embed_tokens.weight"),
    }
    for i in range(p["layers"]):
        pre = f"model.layers.{i}."
        for short, name in [("attn_norm", "input_layernorm.weight"), ("ffn_norm", "post_attention_layernorm.weight"),
                            ("q", "self_attn.q_proj.weight"), ("k", "self_attn.k_proj.weight"),
                            ("v", "self_attn.v_proj.weight"), ("o", "self_attn.o_proj.weight"),
                            ("qb", "self_attn.q_proj.bias"), ("kb", "self_attn.k_proj.bias"),
                            ("vb", "self_attn.v_proj.bias"), ("q_norm", "self_attn.q_norm.weight"),
                            ("k_norm", "self_attn.k_norm.weight"), ("gate", "mlp.gate_proj.weight"),
                            ("up", "mlp.up_proj.weight"), ("down", "mlp.down_proj.weight")]:
            W[f"{i}.{short}"] = get(pre + name)
        if latent:
            for x in "kv":
                a, b = get(pre + f"self_attn.{x}_a_proj.weight"), get(pre + f"self_attn.{x}_b_proj.weight")
                W[f"{i}.{x}"], W[f"{i}.{x}_a"], W[f"{i}.{x}_b"] = b @ a, a, b
                W[f"{i}.{x}b"] = get(pre + f"self_attn.{x}_b_proj.bias")
    return p, W


def load_gguf(path):
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(path)
    field = lambda k: r.fields[k].contents() if k in r.fields else None
    arch = field("general.architecture")
    heads = field(f"{arch}.attention.head_count")
    hidden = field(f"{arch}.embedding_length")
    tensors = {}
    for t in r.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float64)
        tensors[t.name] = arr.reshape([int(x) for x in reversed(t.shape)]) if arr.ndim == 1 and len(t.shape) > 1 else arr
    p = dict(
        layers=field(f"{arch}.block_count"), heads=heads, kv_heads=field(f"{arch}.attention.head_count_kv") or heads,
        head_dim=hidden // heads, eps=field(f"{arch}.attention.layer_norm_rms_epsilon"),
        theta=field(f"{arch}.rope.freq_base") or 10000.0,
        # llama.cpp applies "normal" (adjacent-pair) rope to llama and "neox" (half split) rope to qwen2.
        interleaved=arch == "llama", qk_norm=arch == "qwen3",
    )
    get = lambda n: tensors.get(n)
    W = {"embed": get("token_embd.weight"), "norm": get("output_norm.weight"),
         "lm_head": get("output.weight") if "output.weight" in tensors else get("token_embd.weight")}
    for i in range(p["layers"]):
        for short, name in [("attn_norm", "attn_norm.weight"), ("ffn_norm", "ffn_norm.weight"), ("q", "attn_q.weight"),
                            ("k", "attn_k.weight"), ("v", "attn_v.weight"), ("o", "attn_output.weight"),
                            ("qb", "attn_q.bias"), ("kb", "attn_k.bias"), ("vb", "attn_v.bias"),
                            ("q_norm", "attn_q_norm.weight"), ("k_norm", "attn_k_norm.weight"),
                            ("gate", "ffn_gate.weight"), ("up", "ffn_up.weight"), ("down", "ffn_down.weight")]:
            W[f"{i}.{short}"] = get(f"blk.{i}.{name}")
    return p, W


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, theta, interleaved):
    # x: [T, H, D]
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def forward(p, W, tokens, kv_dtype="f32"):
    T = len(tokens)
    H, KV, D = p["heads"], p["kv_heads"], p["head_dim"]
    x = W["embed"][tokens]
    pos = np.arange(T, dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for i in range(p["layers"]):
        g = lambda n: W[f"{i}.{n}"]
        h = rms_norm(x, g("attn_norm"), p["eps"])
        q, k, v = h @ g("q").T, h @ g("k").T, h @ g("v").T
        latent_f16 = kv_dtype == "f16" and W.get(f"{i}.k_a") is not None
        if latent_f16:
            # The cache holds the latents: they are rounded, then expanded.
            half = lambda a: a.astype(np.float16).astype(np.float64)
            k, v = half(h @ g("k_a").T) @ g("k_b").T, half(h @ g("v_a").T) @ g("v_b").T
        if g("qb") is not None:
            q = q + g("qb")
        if g("kb") is not None:
            k, v = k + g("kb"), v + g("vb")
        q, k, v = q.reshape(T, H, D), k.reshape(T, KV, D), v.reshape(T, KV, D)
        if p["qk_norm"]:
            q, k = rms_norm(q, g("q_norm"), p["eps"]), rms_norm(k, g("k_norm"), p["eps"])
        q, k = rope(q, pos, p["theta"], p["interleaved"]), rope(k, pos, p["theta"], p["interleaved"])
        if kv_dtype == "f16" and not latent_f16:
            k, v = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", s, v).reshape(T, H * D)
        x = x + a @ g("o").T
        h = rms_norm(x, g("ffn_norm"), p["eps"])
        gate, up = h @ g("gate").T, h @ g("up").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g("down").T
    return rms_norm(x, W["norm"], p["eps"]) @ W["lm_head"].T


def main():
    path, tokens, out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
    kv_dtype = sys.argv[4] if len(sys.argv) > 4 else "f32"
    p, W = load_hf(path) if os.path.isdir(path) else load_gguf(path)
    np.save(out, forward(p, W, tokens, kv_dtype).astype(np.float32))


if __name__ == "__main__":
    main()
