"""Worker contexts: which device a worker drives and what it reserves on the cluster."""

from __future__ import annotations

import mxnet as mx

__all__ = ["WorkerContext", "workers", "floor_of", "resources_of", "local_device"]


class WorkerContext(mx.Context):
    """An ``mx.Context`` that also carries the Ray resources its worker reserves.

    ``mx.cpu(i)`` reserves one CPU and ``mx.gpu(i)`` one GPU; a ``WorkerContext`` reserves
    exactly ``cpus`` CPUs and ``gpus`` GPUs, so a worker can own several cores. An
    ``optional`` one is a worker the module starts without when the cluster has no room for it
    yet (an autoscaler is asked for it), and that an elastic ``fit`` admits when it is up.
    """

    def __init__(
        self,
        device_type: str,
        device_id: int = 0,
        cpus: float = 1,
        gpus: float = 0,
        optional: bool = False,
    ):
        super().__init__(device_type, device_id)
        if cpus < 0 or gpus < 0:
            raise ValueError(f"WorkerContext: cpus={cpus} and gpus={gpus} must be >= 0")
        if device_type == "gpu" and gpus <= 0:
            raise ValueError(f"WorkerContext: a gpu context needs gpus > 0, got gpus={gpus}")
        self.cpus = cpus
        self.gpus = gpus
        self.optional = bool(optional)

    def __repr__(self) -> str:
        device = f"{self.device_type}({self.device_id})"
        optional = ", optional=True" if self.optional else ""
        return f"WorkerContext({device}, cpus={self.cpus}, gpus={self.gpus}{optional})"


def workers(
    n: int, cpus: float = 1, gpus: float = 0, max_workers: int | None = None
) -> list[WorkerContext]:
    """Worker contexts for a cluster, each reserving ``cpus`` CPUs and ``gpus`` GPUs: ``n``
    that training needs, and up to ``max_workers`` in all (the others ``optional``).

    Pass the result as ``context=`` to :class:`raymodule.Module`. With ``max_workers``, the
    workers start as soon as ``n`` are up (when the cluster has no room for all within
    RAYMODULE_START_WAIT_S), the others keep asking the cluster (an autoscaler adds nodes
    for them), and an elastic ``fit`` (one with a ``RunConfig``) admits each at a step
    boundary as it comes up: the global batch and the sample order stay the same, each
    worker's share shrinks. ``n`` is also the run's elastic floor unless
    ``RunConfig.min_workers`` sets another.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"workers(n={n!r}): n must be an int >= 1")
    total = n if max_workers is None else max_workers
    if not isinstance(total, int) or isinstance(total, bool) or total < n:
        raise ValueError(f"workers(max_workers={max_workers!r}): must be an int >= n={n}")
    device_type = "gpu" if gpus > 0 else "cpu"
    return [
        WorkerContext(device_type, i, cpus=cpus, gpus=gpus, optional=i >= n) for i in range(total)
    ]


def floor_of(contexts: list[mx.Context]) -> int | None:
    """How many of ``contexts`` are needed (at least one), if any are optional (None: all)."""
    needed = max(1, sum(not getattr(c, "optional", False) for c in contexts))
    return needed if needed < len(contexts) else None


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
