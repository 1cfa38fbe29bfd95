"""Studies that reproduce MeteoRA's claims end to end (issue 6: SmolLM2-135M + 22 BIG-bench tasks).

``bigbench_study``: the resumable steps behind ``scripts/reproduce_bigbench.py`` (config, state, data and
base packing for the GPU machine, adapters, convert, gates, evaluation, report). ``peft_train``: K LoRA
adapters trained at once in one torch model and exported as standard PEFT directories. Neither module
imports torch at import time (the study's steps import what they need when they run).
"""

from meteora_jax.study.bigbench_study import StudyConfig, load_study_config, run_study, step_names
from meteora_jax.study.peft_train import AdapterData, PeftTrainConfig, export_peft_adapter, train_adapters

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
