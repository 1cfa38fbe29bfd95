"""Test and demo fixtures: tiny random HF checkpoints of every supported family, the real SmolLM2 GGUF."""
