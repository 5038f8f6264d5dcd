"""raymodule: MXNet's Module API, data-parallel on Ray.

Change ``mx.mod.Module`` to ``raymodule.Module``; each entry of ``context`` becomes a Ray worker
actor holding a replica, and gradients are summed across workers by a fused allreduce.
"""

from .context import WorkerContext, workers
from .errors import (
    CallOrderError,
    PlacementError,
    RayModuleError,
    WorkerError,
    WorkerLostError,
)
from .module import Module

__all__ = [
    "Module",
    "WorkerContext",
    "workers",
    "RayModuleError",
    "CallOrderError",
    "PlacementError",
    "WorkerError",
    "WorkerLostError",
]
__version__ = "0.1.0"
