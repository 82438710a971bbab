"""The speculative-decoding peer: llama.cpp (llama-cpp-python, 2 threads) generating greedily from the
same prompt tokens on the same GGUF file, plain and with prompt-lookup (n-gram) drafting, timed like
`tandem bench spec` (decode tok/s from the first token to the last).

usage: python3 scripts/peer_llamacpp_spec.py MODEL.gguf --dtype f32 --max-tokens N --k 4,10 < prompts.json
prompts.json: {"edit": [token ids], "write": [...]}. Prints JSON rows on stdout.
"""
import argparse
import json
import sys
import time

from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from peer_llamacpp import dequantized, load_llama  # noqa: E402


def run(llm, prompt, max_tokens):
    llm.reset()
    start = time.perf_counter()
    first = None
    n = 0
    for _ in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": n, "decode_tok_s": (n - 1) / max(end - first, 1e-9), "total_secs": end - start}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", choices=["f32", "bf16"])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--k", default="10")
    a = ap.parse_args()
    prompts = json.load(sys.stdin)
    path = dequantized(a.model, a.dtype) if a.dtype else a.model
    rows = []
    ks = [] if a.k in ("", "none") else [int(k) for k in a.k.split(",")]
    modes = [("plain", None)] + [("ngram", k) for k in ks]
    for mode, k in modes:
        draft = LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=k) if k else None
        llm = load_llama(path, n_ctx=2048, n_threads=2, n_threads_batch=2, n_batch=512,
                         draft_model=draft, logits_all=draft is not None, verbose=False)
        for kind, prompt in prompts.items():
            r = run(llm, prompt, a.max_tokens)
            r.update({"prompt": kind, "mode": mode, "k": k or 0})
            rows.append(r)
        del llm
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    main()
