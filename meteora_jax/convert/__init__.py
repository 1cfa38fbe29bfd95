"""Checkpoint readers and converters: HF / GGUF base models (``base.load_base``), adapters, original MeteoRA."""
