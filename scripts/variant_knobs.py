"""``VARIANT+KNOB=N`` for the profiling scripts: a trace-time knob (``meteora_jax.knobs``) set for one variant
only, so that one process can A/B the choices the automatic path makes (``profile_decode.py``,
``profile_prefill.py``)."""

from __future__ import annotations

from meteora_jax.knobs import KNOBS, knobs_set, parse_value

__all__ = ["KNOBS", "knobs_set", "parse_variant"]


def parse_variant(variant: str, aliases: dict[str, str] | None = None) -> tuple[str, dict[str, int]]:
    """``name+knob=N+...`` -> (name, {knob: N}); a bad knob or value is a ValueError (``MeteoraInputError``)
    naming the knobs. ``aliases`` maps a script's older option names to ``knob=N`` (``profile_prefill.py``'s
    ``f32gate``)."""
    name, *opts = variant.split("+")
    knobs = {}
    for opt in opts:
        key, _, value = (aliases or {}).get(opt, opt).partition("=")
        knobs[key] = parse_value(key, value, where=f"variant {variant!r}")
    return name, knobs
