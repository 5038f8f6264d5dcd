"""raymodule: MXNet's Module API, data-parallel on Ray.

Change ``mx.mod.Module`` to ``raymodule.Module``; each entry of ``context`` becomes a Ray worker
actor holding a replica, and gradients are summed across workers by a fused allreduce.

The MXNet-facing names are loaded on first use, so that raymodule's controller actor (which
imports this package) starts without importing MXNet; so is ``raymodule.tune`` (Ray Tune
sweeps), which ``import raymodule`` does not import.
"""

from __future__ import annotations

import importlib

from .errors import (
    CallOrderError,
    CheckpointError,
    PlacementError,
    Preempted,
    RayModuleError,
    ResumeMismatch,
    WorkerError,
    WorkerLostError,
)

__all__ = [
    "Module",
    "BucketingModule",
    "RunConfig",
    "Checkpoint",
    "latest_checkpoint",
    "WorkerContext",
    "workers",
    "ArrayDataset",
    "DatasetIter",
    "RecordIODataset",
    "RayDataIter",
    "RayModuleError",
    "CallOrderError",
    "PlacementError",
    "WorkerError",
    "WorkerLostError",
    "CheckpointError",
    "ResumeMismatch",
    "Preempted",
    "tune",
]
__version__ = "0.1.0"

_LAZY = {
    "Module": ".module",
    "BucketingModule": ".bucketing",
    "WorkerContext": ".context",
    "workers": ".context",
    "RunConfig": ".run",
    "Checkpoint": ".checkpoint",
    "latest_checkpoint": ".checkpoint",
    "ArrayDataset": ".data",
    "DatasetIter": ".data",
    "RecordIODataset": ".data",
    "RayDataIter": ".data",
}
_SUBMODULES = {"data", "tune"}  # raymodule.data.X works after a plain import raymodule


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'raymodule' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
