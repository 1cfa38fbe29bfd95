"""Studies that reproduce MeteoRA's claims end to end (issue 6: SmolLM2-135M + 22 BIG-bench tasks).

The resumable steps behind ``scripts/reproduce_bigbench.py``, one module per concern: ``config`` (dataclasses,
YAML loading), ``state`` (state.json, the step context, the plan), ``packs`` (data and base packing for the
GPU machine; the data and base steps), ``training`` (adapters, convert, gates), ``evaluate`` (single-task
evaluation), ``composite`` (composite-n evaluation), ``report`` (JSON, Markdown, plots, "must show" table)
and ``pipeline`` (the step runner). ``peft_train``: K LoRA adapters trained at once in one torch model and
exported as standard PEFT directories. No module imports torch at import time (the study's steps import
what they need when they run).
"""

from meteora_jax.study.config import StudyConfig, load_study_config
from meteora_jax.study.peft_train import AdapterData, PeftTrainConfig, export_peft_adapter, train_adapters
from meteora_jax.study.pipeline import run_study
from meteora_jax.study.state import step_names

__all__ = [
    "AdapterData",
    "PeftTrainConfig",
    "StudyConfig",
    "export_peft_adapter",
    "load_study_config",
    "run_study",
    "step_names",
    "train_adapters",
]
