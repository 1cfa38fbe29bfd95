"""The LLaMA-family model with MoE-LoRA projections."""
