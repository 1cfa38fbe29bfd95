"""``VARIANT+KNOB=N`` for the profiling scripts: a trace-time knob (``meteora_jax.knobs``) set for one variant
only, so that one process can A/B the choices the automatic path makes (``profile_decode.py``,
``profile_prefill.py``)."""

from __future__ import annotations

import sys

from meteora_jax.knobs import KNOBS, knobs_set

__all__ = ["KNOBS", "knobs_set", "parse_variant"]


def parse_variant(variant: str, aliases: dict[str, str] | None = None) -> tuple[str, dict[str, int]]:
    """``name+knob=N+...`` -> (name, {knob: N}); ValueError names the knobs on a bad one. ``aliases`` maps a
    script's older option names to ``knob=N`` (``profile_prefill.py``'s ``f32gate``)."""
    name, *opts = variant.split("+")
    knobs = {}
    for opt in opts:
        key, _, value = (aliases or {}).get(opt, opt).partition("=")
        if key not in KNOBS or not (value.isdigit() or value == "inf"):
            raise ValueError(
                f"variant {variant!r}: expected +KNOB=N (N an integer or inf), KNOB in {list(KNOBS)}"
            )
        knobs[key] = sys.maxsize if value == "inf" else int(value)
    return name, knobs
