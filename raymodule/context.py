"""Worker contexts: which device a worker drives and what it reserves on the cluster."""

from __future__ import annotations

import mxnet as mx

__all__ = ["WorkerContext", "workers", "resources_of", "local_device"]


class WorkerContext(mx.Context):
    """An ``mx.Context`` that also carries the Ray resources its worker reserves.

    ``mx.cpu(i)`` reserves one CPU and ``mx.gpu(i)`` one GPU; a ``WorkerContext`` reserves
    exactly ``cpus`` CPUs and ``gpus`` GPUs, so a worker can own several cores.
    """

    def __init__(self, device_type: str, device_id: int = 0, cpus: float = 1, gpus: float = 0):
        super().__init__(device_type, device_id)
        if cpus < 0 or gpus < 0:
            raise ValueError(f"WorkerContext: cpus={cpus} and gpus={gpus} must be >= 0")
        if device_type == "gpu" and gpus <= 0:
            raise ValueError(f"WorkerContext: a gpu context needs gpus > 0, got gpus={gpus}")
        self.cpus = cpus
        self.gpus = gpus

    def __repr__(self) -> str:
        device = f"{self.device_type}({self.device_id})"
        return f"WorkerContext({device}, cpus={self.cpus}, gpus={self.gpus})"


def workers(n: int, cpus: float = 1, gpus: float = 0) -> list[WorkerContext]:
    """``n`` worker contexts for a cluster, each reserving ``cpus`` CPUs and ``gpus`` GPUs.

    Pass the result as ``context=`` to :class:`raymodule.Module`.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"workers(n={n!r}): n must be an int >= 1")
    device_type = "gpu" if gpus > 0 else "cpu"
    return [WorkerContext(device_type, i, cpus=cpus, gpus=gpus) for i in range(n)]


def resources_of(ctx: mx.Context) -> dict[str, float]:
    """The Ray resources the worker for ``ctx`` reserves."""
    if isinstance(ctx, WorkerContext):
        resources = {"CPU": ctx.cpus, "GPU": ctx.gpus}
    elif ctx.device_type == "gpu":
        resources = {"GPU": 1}
    else:
        resources = {"CPU": 1}
    return {k: v for k, v in resources.items() if v > 0}


def local_device(ctx: mx.Context) -> str:
    """The device type a worker binds on; it sees its own device as index 0 (Ray sets
    visibility). A plain string, so the controller that passes it on needs no MXNet."""
    return "gpu" if ctx.device_type == "gpu" else "cpu"
