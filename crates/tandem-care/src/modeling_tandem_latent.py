"""Loads a `tandem convert care` folder into Hugging Face transformers.

The folder holds a Llama / Qwen2 / Qwen3 checkpoint whose key and value projections are factored:
per layer `self_attn.k_a_proj.weight` [r_K, hidden] (hidden state -> latent), `self_attn.k_b_proj`
[kv_heads * head_dim, r_K] (latent -> keys, with the bias where the model has one), likewise
`v_a_proj` / `v_b_proj`, and `latent_kv: {k_ranks, v_ranks}` in config.json. This file builds the
stock transformers model for the architecture and puts each layer's factors in place of its
k_proj and v_proj, so any transformers code runs the converted model:

    import sys; sys.path.insert(0, FOLDER)
    from modeling_tandem_latent import load
    model = load(FOLDER)          # a LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM

transformers caches the expanded keys and values, so it computes what the converted model
computes but does not get its smaller cache (tandem serves the latents: `tandem serve --model
FOLDER`). Command line: `python3 modeling_tandem_latent.py FOLDER TOKENS OUT.npy [DTYPE]` writes
the logits of comma-separated token ids, computed in DTYPE (float32 unless given; float64 makes it
an exact reference: tandem's tests use it so that torch's own float32 rounding is not measured).
"""
import json
import os
import sys

import torch
from torch import nn


class Factored(nn.Module):
    """x -> b(a(x)): a projection through a latent of rank r."""

    def __init__(self, a, b, bias):
        super().__init__()
        self.a = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.b = nn.Linear(b.shape[1], b.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.a.weight.copy_(a)
            self.b.weight.copy_(b)
            if bias is not None:
                self.b.bias.copy_(bias)

    def forward(self, x):
        return self.b(self.a(x))


def load(folder, dtype=torch.float32):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.load(open(os.path.join(folder, "config.json")))
    latent = cfg.pop("latent_kv", None)
    if not latent:
        raise ValueError(f"{folder} has no latent_kv in its config.json: not a converted checkpoint")
    cfg.pop("tandem_conversion", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    state = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, f)))
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for x, ranks in (("k", latent["k_ranks"]), ("v", latent["v_ranks"])):
            p = f"model.layers.{i}.self_attn.{x}_"
            a, b = state.pop(p + "a_proj.weight"), state.pop(p + "b_proj.weight")
            if a.shape[0] != ranks[i]:
                raise ValueError(f"layer {i}: {x}_a_proj has rank {a.shape[0]}, config.json says {ranks[i]}")
            setattr(attn, f"{x}_proj", Factored(a, b, state.pop(p + "b_proj.bias", None)).to(dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    factored = ("k_proj.", "v_proj.")
    tied = cfg.get("tie_word_embeddings", False)
    missing = [m for m in missing if not any(f in m for f in factored) and not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights that do not fit: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model.eval()


def main():
    import numpy as np

    folder, tokens, out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
    dtype = getattr(torch, sys.argv[4]) if len(sys.argv) > 4 else torch.float32
    model = load(folder, dtype)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    np.save(out, logits.float().numpy())


if __name__ == "__main__":
    main()
