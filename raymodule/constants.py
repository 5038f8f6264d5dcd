"""Tunables that are not per run: one place, each an environment variable with a default.

Tests shrink them through the environment instead of sleeping. Values are read when used, so a
change to ``os.environ`` takes effect for modules created afterwards.
"""

from __future__ import annotations

import os

__all__ = [
    "ALLREDUCE_BUCKET_BYTES",
    "COLLECTIVE_TIMEOUT_S",
    "PIPELINE_DEPTH",
    "STEPS_PER_CALL",
    "PLACEMENT_TIMEOUT_S",
    "PLACEMENT_REPORT_INTERVAL_S",
    "env_float",
    "env_int",
]

# (environment variable, default)
PLACEMENT_TIMEOUT_S = ("RAYMODULE_PLACEMENT_TIMEOUT_S", 600.0)
"""How long workers may wait for resources on a connected cluster (an autoscaler may add nodes)."""
PLACEMENT_REPORT_INTERVAL_S = ("RAYMODULE_PLACEMENT_REPORT_INTERVAL_S", 30.0)
"""How often a pending placement says what it is waiting for."""
COLLECTIVE_TIMEOUT_S = ("RAYMODULE_COLLECTIVE_TIMEOUT_S", 300.0)
"""Bound on every collective call and rendezvous: a silent worker never hangs the run."""
ALLREDUCE_BUCKET_BYTES = ("RAYMODULE_ALLREDUCE_BUCKET_BYTES", 4 * 1024 * 1024)
"""Gradients are fused into buckets of at most this many bytes, one collective call each."""
STEPS_PER_CALL = ("RAYMODULE_STEPS_PER_CALL", 4)
"""Batches sent to the workers in one call (one object-store transfer) by fit and score."""
PIPELINE_DEPTH = ("RAYMODULE_PIPELINE_DEPTH", 2)
"""Calls of STEPS_PER_CALL batches in flight ahead of the one whose results the client reads."""


def env_float(spec: tuple[str, float]) -> float:
    name, default = spec
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return float(default)
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a number") from None


def env_int(spec: tuple[str, int]) -> int:
    value = env_float(spec)
    if value != int(value):
        raise ValueError(f"{spec[0]}={value} must be an integer")
    return int(value)
