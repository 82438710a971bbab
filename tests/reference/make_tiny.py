"""Writes tiny random Hugging Face checkpoints (config.json, safetensors, tokenizer.json,
tokenizer_config.json) for the test suite: Llama, Qwen2 and Qwen3 shapes with GQA, tied and
untied embeddings, q/k norm, qkv bias, f32/f16/bf16 storage and a sharded variant.

usage: python3 make_tiny.py OUT_DIR
"""
import json
import os
import struct
import sys

import numpy as np

VOCAB = 280  # 256 byte tokens, a few merges, specials, and unused rows


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_json():
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: i for i, b in enumerate(range(256))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = []
    for s in specials:
        added.append({"id": len(vocab), "content": s, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
        vocab[s] = len(vocab)
    assert len(vocab) <= VOCAB
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def to_bytes(a, dtype):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "F32":
        return a.tobytes()
    if dtype == "F16":
        return a.astype(np.float16).tobytes()
    if dtype == "BF16":
        # Round to nearest even, as torch does.
        u = a.view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return u.tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors, dtype):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = to_bytes(arr, dtype)
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def make(out, name, arch, dtype="F32", tied=False, shards=1, head_dim=None, seed=0, attention_bias=None):
    rng = np.random.default_rng(seed)
    hidden, inter, layers, heads, kv_heads = 64, 128, 2, 4, 2
    hd = head_dim or hidden // heads
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    w = lambda *s: (rng.standard_normal(s) * 0.08).astype(np.float32)
    norm = lambda n: (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)
    t = {"model.embed_tokens.weight": w(VOCAB, hidden), "model.norm.weight": norm(hidden)}
    if not tied:
        t["lm_head.weight"] = w(VOCAB, hidden)
    bias = arch == "qwen2" if attention_bias is None else attention_bias
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(hidden)
        t[p + "post_attention_layernorm.weight"] = norm(hidden)
        t[p + "self_attn.q_proj.weight"] = w(heads * hd, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * hd, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * hd, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * hd)
        if bias:
            t[p + "self_attn.q_proj.bias"] = w(heads * hd) * 4
            t[p + "self_attn.k_proj.bias"] = w(kv_heads * hd) * 4
            t[p + "self_attn.v_proj.bias"] = w(kv_heads * hd) * 4
        if arch == "qwen3":
            t[p + "self_attn.q_norm.weight"] = norm(hd)
            t[p + "self_attn.k_norm.weight"] = norm(hd)
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter)
    names = list(t)
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), t, dtype)
    else:
        weight_map = {}
        per = (len(names) + shards - 1) // shards
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: t[n] for n in names[s * per:(s + 1) * per]}
            write_safetensors(os.path.join(folder, fname), part, dtype)
            weight_map.update({n: fname for n in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0 if arch == "llama" else 1000000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": tied, "hidden_act": "silu",
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
        "bos_token_id": 256 + 4, "eos_token_id": 256 + 6,
    }
    if head_dim:
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = bias
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(), f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}, f)


def main():
    out = sys.argv[1]
    make(out, "llama-gqa-untied-sharded", "llama", shards=3, seed=1)
    make(out, "llama-bf16-tied", "llama", dtype="BF16", tied=True, seed=2)
    make(out, "qwen2-tied-bias", "qwen2", tied=True, seed=3)
    make(out, "qwen2-f16-untied", "qwen2", dtype="F16", seed=4)
    make(out, "qwen3-qknorm-untied", "qwen3", head_dim=32, seed=5)
    make(out, "qwen3-qknorm-tied", "qwen3", tied=True, seed=6)


if __name__ == "__main__":
    main()
