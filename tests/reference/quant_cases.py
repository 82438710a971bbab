"""Quantized weight matrices and their dequantization by the `gguf` package, the independent
reference for tandem's quantized kernels.

Usage: quant_cases.py OUT_DIR [GGUF_FILE ...]

For every block format the kernels support, writes a random matrix (random bits, with the block's
half-float scales set to modest random values: every bit pattern of the quantized values is a valid
block) and, for each GGUF file given, up to 48 rows of one real tensor of each format it holds:
`NAME.q` (the raw blocks, row-major), `NAME.f32` (gguf's dequantization, float32) and an entry in
`cases.json` {name, format, rows, cols}.
"""
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

FORMATS = {"Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "Q8_0": T.Q8_0,
           "Q4_K": T.Q4_K, "Q5_K": T.Q5_K, "Q6_K": T.Q6_K}
# Byte offsets of the half-float scales in each block.
HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(fmt, rows, cols, rng):
    block, size = GGML_QUANT_SIZES[FORMATS[fmt]]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for at in HALF_FIELDS[fmt]:
        halves = rng.uniform(-0.05, 0.05, size=n).astype(np.float16)
        raw[:, at:at + 2] = halves.view(np.uint8).reshape(n, 2)
    return raw.reshape(-1)


def write(out, cases, name, fmt, rows, cols, raw):
    deq = dequantize(raw.reshape(rows, -1), FORMATS[fmt]).astype(np.float32).reshape(rows, cols)
    raw.tofile(os.path.join(out, name + ".q"))
    deq.tofile(os.path.join(out, name + ".f32"))
    cases.append({"name": name, "format": fmt, "rows": rows, "cols": cols})


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(7)
    cases = []
    for fmt in FORMATS:
        block = GGML_QUANT_SIZES[FORMATS[fmt]][0]
        cols = block * (3 if block == 256 else 9)  # 768 or 288: several blocks, not a power of two
        write(out, cases, f"random-{fmt}", fmt, 37, cols, random_blocks(fmt, 37, cols, rng))
    for path in sys.argv[2:]:
        seen = set()
        for t in GGUFReader(path).tensors:
            fmt = next((f for f, q in FORMATS.items() if q == t.tensor_type), None)
            if fmt is None or fmt in seen or len(t.shape) != 2:
                continue
            seen.add(fmt)
            cols = int(t.shape[0])  # gguf lists the fastest-varying dimension first
            rows = min(48, int(t.shape[1]))
            raw = np.asarray(t.data).view(np.uint8).reshape(int(t.shape[1]), -1)[:rows].reshape(-1)
            stem = os.path.basename(path).split(".")[0].split("-")[0]
            write(out, cases, f"{stem}-{t.name}-{fmt}", fmt, rows, cols, raw.copy())
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)


if __name__ == "__main__":
    main()
