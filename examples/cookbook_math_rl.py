#!/usr/bin/env python3
"""tinker-cookbook's math RL recipe (`env=arithmetic`) against `tandem serve` on this machine, offline.

The recipe (`tinker_cookbook.recipes.math_rl.train`, tinker-cookbook 0.5.8) runs unchanged. This
wrapper only does what a user of a local server has to say:
- the SDK's key (tandem ignores it) and no telemetry;
- `base_url` of the server and, unless given, the served model's name as `model_name`;
- the served tokenizer registered under that name with
  `tinker_cookbook.tokenizer_utils.register_tokenizer` (the hub cannot be reached; tandem writes
  the tokenizer into a folder that a training client's `get_tokenizer()` loads);
- an explicit `renderer_name` (default `role_colon`: plain "User: ... Assistant: ..." turns, which
  any tokenizer renders; the recipe cannot guess one for a name it does not know).
Every other `key=value` goes to the recipe as it is.

Run (two terminals, or `&`):
    tandem serve --model smollm2 --max-batch 16
    python3 examples/cookbook_math_rl.py groups_per_batch=16 group_size=4 max_steps=30 \\
        learning_rate=3e-4 lora_rank=16 log_path=bench-results/cookbook-math-rl

The recipe writes its metrics to LOG_PATH/metrics.jsonl (`env/all/reward/total` per step).
"""
import asyncio
import os
import sys

os.environ.setdefault("TINKER_API_KEY", "tml-tandem-local")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import chz
import tinker
from tinker_cookbook import tokenizer_utils
from tinker_cookbook.recipes.math_rl import train


def arg(name):
    """The value of `name=value` on the command line, if given."""
    for a in sys.argv[1:]:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def main():
    base_url = arg("base_url") or os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000")
    service = tinker.ServiceClient(base_url=base_url)
    caps = tinker.RestClient(base_url=base_url).get_server_capabilities().result()
    model_name = arg("model_name") or caps.supported_models[0].model_name
    # A rank-1 adapter only to reach the served tokenizer's folder.
    probe = service.create_lora_training_client(base_model=model_name, rank=1).result()
    tokenizer = probe.get_tokenizer()
    tokenizer_utils.register_tokenizer(model_name, lambda: tokenizer)
    given = {a.split("=", 1)[0] for a in sys.argv[1:] if "=" in a}
    defaults = {
        "base_url": base_url,
        "model_name": model_name,
        "renderer_name": "role_colon",
        "env": "arithmetic",
        "behavior_if_log_dir_exists": "delete",
    }
    sys.argv += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    config = chz.entrypoint(train.CLIConfig)
    asyncio.run(train.cli_main(config))


if __name__ == "__main__":
    main()
