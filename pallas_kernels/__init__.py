"""Grouped MoE-LoRA kernels: one public function per op, backends chosen with ``implementation=``."""

from pallas_kernels.grouped_lora.api import (
    grouped_lora,
    grouped_lora_fused,
    grouped_lora_fused_routed,
    grouped_lora_fused_shared,
)
from pallas_kernels.grouped_lora.gating import RouteSpec

__all__ = [
    "RouteSpec",
    "grouped_lora",
    "grouped_lora_fused",
    "grouped_lora_fused_routed",
    "grouped_lora_fused_shared",
]
