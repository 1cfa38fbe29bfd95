"""Generate with a converted model on whatever accelerator JAX finds (a thin wrapper of `meteora-jax generate`).

    python scripts/generate.py --model DIR --prompt "..." --dtype bfloat16 --attention cudnn

On a GPU, bf16 with ``--attention cudnn`` uses cuDNN's fused attention; the MoE-LoRA layers go through
``pallas_kernels.grouped_lora_fused``, which picks its GPU backend itself.
"""

import sys

from meteora_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
