"""Grouped MoE-LoRA kernels: one public function per op, backends chosen with ``implementation=``."""

from pallas_kernels.grouped_lora.api import grouped_lora, grouped_lora_fused, grouped_lora_fused_shared

__all__ = ["grouped_lora", "grouped_lora_fused", "grouped_lora_fused_shared"]
