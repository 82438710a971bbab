"""llama.cpp's negative log-likelihood of given tokens, the peer for tandem's perplexity test.

Usage: llama_perplexity.py GGUF_FILE TOKENS_JSON CHUNK

TOKENS_JSON holds a list of token ids (tokenized by tandem, so both engines score the same ids).
They are scored in chunks of CHUNK tokens, each from an empty context: every position after a
chunk's first predicts the next token. Prints JSON {"nll": total, "count": scored tokens}.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from peer_llamacpp import load_llama  # noqa: E402


def main():
    path, tokens_path, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tokens = json.load(open(tokens_path))
    llm = load_llama(path, n_ctx=chunk, n_batch=chunk, logits_all=True, n_threads=2, verbose=False)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - chunk + 1, chunk):
        ids = tokens[start:start + chunk]
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[:chunk], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= sum(logp[i, ids[i + 1]] for i in range(chunk - 1))
        count += chunk - 1
    print(json.dumps({"nll": nll, "count": count}))


if __name__ == "__main__":
    main()
