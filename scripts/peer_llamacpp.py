"""The benchmark peer: llama.cpp (through llama-cpp-python, 2 threads) timed on the same GGUF file
with the same measurements as `tandem bench`: prefill tok/s, decode tok/s, and the cost of one
forward over k tokens with logits for all k at a given KV depth, relative to k = 1.

With --dtype f32 (or bf16) the file is first dequantized to an F32 (BF16) GGUF by llama.cpp's own
quantize tool (cached beside the original), so that llama.cpp and tandem's dense weights are
compared like for like.

usage: python3 scripts/peer_llamacpp.py MODEL.gguf [--dtype f32|bf16] [--reps N] [--depth D] > result.json
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import llama_cpp
from llama_cpp import Llama


def dequantized(path, dtype):
    out = path[: -len(".gguf")] + f".{dtype.upper()}.gguf"
    if not os.path.exists(out):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32, "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16}[dtype]
        params.allow_requantize = True
        rc = llama_cpp.llama_model_quantize(path.encode(), (out + ".tmp").encode(), ctypes.byref(params))
        if rc != 0:
            sys.exit(f"llama_model_quantize failed ({rc})")
        os.rename(out + ".tmp", out)
    return out


def load_llama(path, **kw):
    """A llama.cpp model, loaded so that it runs on this CPU.

    On CPUs with AMX (Intel Xeon 4th gen and later) llama.cpp 0.3.36's AMX matmul, one of ggml's
    "extra buffer types", segfaults on the first eval (seen on this project's Xeon CI machines).
    There the model is loaded without extra buffer types: ggml's ordinary CPU kernels (AVX-512),
    without weight repacking. Elsewhere nothing changes.
    """
    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        return Llama(model_path=path, **kw)
    print("llama.cpp: AMX CPU, loading without extra buffer types (its AMX matmul crashes)", file=sys.stderr)
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return Llama(model_path=path, **kw)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def tokens(n, salt):
    return [((i * 7919 + salt * 104729 + 17) % 30000) for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", choices=["f32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--depth", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    a = ap.parse_args()
    path = dequantized(a.model, a.dtype) if a.dtype else a.model
    llm = load_llama(path, n_ctx=1024, n_threads=2, n_threads_batch=2, n_batch=512, logits_all=True, verbose=False)
    llm.eval(tokens(8, 0))

    prefill = []
    for r in range(a.reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens(a.prompt_tokens, r + 1))
        prefill.append(a.prompt_tokens / (time.perf_counter() - t))

    decode = []
    for r in range(min(a.reps, 3)):
        llm.reset()
        llm.eval(tokens(16, r + 7))
        toks = tokens(a.decode_tokens, r + 11)
        t = time.perf_counter()
        for tok in toks:
            llm.eval([tok])
        decode.append(a.decode_tokens / (time.perf_counter() - t))

    llm.reset()
    llm.eval(tokens(a.depth, 3))
    ks = {}
    for k in [1, 2, 4, 8, 16]:
        times = []
        for _ in range(max(a.reps, 3) * 2):
            t = time.perf_counter()
            llm.eval(tokens(k, k))
            times.append(time.perf_counter() - t)
            llm.n_tokens = a.depth
            llm._ctx.kv_cache_seq_rm(-1, a.depth, -1)
        ks[k] = statistics.median(times)
    json.dump({
        "model": os.path.basename(path),
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "k_forward_secs": [[k, s] for k, s in ks.items()],
        "k_cost_ratio": [[k, s / ks[1]] for k, s in ks.items()],
    }, sys.stdout)


if __name__ == "__main__":
    main()
