"""xorl-client 0.1.0 (XoRL's JSON client) against `tandem serve`: create a LoRA model by name,
train with forward_backward / optim_step (JSON bodies), save weights for the sampler, sample them
through the SGLang-style /generate, and check the sampler's logprobs are what training computes.
Usage: test_xorl.py BASE_URL MODEL_NAME.
"""
import sys

import numpy as np
from xorl_client import ServiceClient, types

URL, BASE = sys.argv[1], sys.argv[2]
service = ServiceClient(base_url=URL)
tc = service.create_lora_training_client(base_model=BASE, rank=8, model_id="xorl-test")
seq = [3 + (j * 5) % 40 for j in range(16)]
datum = types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                    loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * 15})
losses = []
for _ in range(6):
    out = tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    losses.append(out.metrics["loss:sum"])
print("xorl SFT loss:", [round(x, 2) for x in losses])
assert losses[-1] < 0.7 * losses[0], losses

sampler = tc.save_weights_and_get_sampling_client(name="xorl-step", inference_base_url=URL)
res = sampler.sample(types.ModelInput.from_ints(seq[:5]), types.SamplingParams(max_tokens=6, temperature=1.0),
                     num_samples=2).result()
assert len(res.sequences) == 2
s = res.sequences[0]
assert len(s.tokens) == 6 and len(s.logprobs) == 6, s
full = seq[:5] + list(s.tokens)
fwd = tc.forward([types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                              loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)})],
                 "cross_entropy").result()
lp = np.array(fwd.loss_fn_outputs[0]["logprobs"].tolist())[4:]
assert np.abs(lp - np.array(s.logprobs)).max() < 1e-5, (lp, s.logprobs)
print("xorl-client: all checks passed")
