"""A trial's reservation: its process and its workers in one placement group, checked against
the cluster (waiting, bounded, for one that may grow) before Tune creates trials."""

from __future__ import annotations

import functools
import logging
import math
import time

import ray

from .. import runtime
from ..constants import Settings
from ..errors import PlacementError
from .trial import Trial, TrialResources, fmt

log = logging.getLogger(__name__)


def with_workers(
    train_fn, num_workers: int, cpus: float = 1, gpus: float = 0, *, head_cpus: float = 0
):
    """``train_fn(config)``, which builds a :class:`raymodule.Module` on
    :func:`workers` (or ``raymodule.workers(num_workers, cpus=cpus, gpus=gpus)``) and fits it,
    as a Tune trainable whose trial reserves its process and its workers up front.

    Args:
        train_fn: the trial function, ``train_fn(config)``.
        num_workers: workers each trial's module starts.
        cpus, gpus: what each worker reserves (as :func:`raymodule.workers`).
        head_cpus: CPUs reserved for the trial process itself, which reads the data and runs
            the callbacks (default 0: it shares the first worker's bundle, as the client of a
            plain run reserves nothing).

    Returns a trainable for ``ray.tune.Tuner``. A sweep whose trial cannot fit the cluster
    raises :class:`raymodule.PlacementError` when Tune creates its first trial, saying what a
    trial asks for, what the cluster has, and what to change: at once on a Ray without an
    autoscaler (one this process or raymodule started), after ``RAYMODULE_PLACEMENT_TIMEOUT_S``
    on a cluster that may grow.
    """
    from ray import tune

    if not callable(train_fn):
        raise TypeError(f"with_workers(train_fn={train_fn!r}): expected a function of config")
    if not _is_int(num_workers) or num_workers < 1:
        raise ValueError(f"with_workers(num_workers={num_workers!r}): must be an integer >= 1")
    for name, value in (("cpus", cpus), ("gpus", gpus), ("head_cpus", head_cpus)):
        if not _is_number(value) or value < 0:
            raise ValueError(f"with_workers({name}={value!r}): must be a number >= 0")
    if cpus == 0 and gpus == 0:
        raise ValueError("with_workers(cpus=0, gpus=0): each worker must reserve a CPU or a GPU")
    spec = TrialResources(num_workers, cpus, gpus, head_cpus)
    factory = tune.PlacementGroupFactory(spec.bundles(), strategy="PACK")

    def resources(config) -> tune.PlacementGroupFactory:
        _check_fits(spec)  # called by Tune on the driver for every trial it creates
        return factory

    @functools.wraps(train_fn)
    def trainable(config):
        Trial.start(spec)
        output = train_fn(config)
        for reporter in Trial.reporters:  # the last epoch's report
            reporter.flush()
        return output

    return tune.with_resources(trainable, resources)


def workers():
    """The worker contexts the current trial reserved (``context=`` of its module)."""
    from ..context import workers as make

    spec = Trial.resources
    if spec is None:
        raise RuntimeError(
            "raymodule.tune.workers() is for trial functions run through "
            "raymodule.tune.with_workers(train_fn, num_workers, ...)"
        )
    return make(spec.num_workers, cpus=spec.cpus, gpus=spec.gpus)


_checked: set = set()  # TrialResources that fit this cluster


def _check_fits(spec: TrialResources) -> None:
    """Raises ``PlacementError`` if one trial of ``spec`` can never be placed on this cluster
    (waiting, bounded, for a cluster that may grow)."""
    if spec in _checked or not ray.is_initialized():
        return
    problem = _unfit(spec)
    if problem is not None and _can_grow():
        settings = Settings.from_env()
        problem = _wait_for_room(spec, settings)
        if problem is not None:
            problem += (
                f" (waited {settings.placement_timeout_s:g} s for the cluster to grow; "
                "RAYMODULE_PLACEMENT_TIMEOUT_S sets the wait)"
            )
    if problem is not None:
        raise PlacementError(
            f"this sweep's trials cannot fit the cluster: each trial reserves "
            f"{spec.describe()} = {fmt(spec.total())}, but {problem}. Give "
            "raymodule.tune.with_workers fewer workers (num_workers) or fewer cpus/gpus per "
            "worker (or head_cpus), or run the sweep on a cluster with more resources"
        )
    _checked.add(spec)


def _unfit(spec: TrialResources) -> str | None:
    """Why one trial cannot be placed on the cluster as it is (alive nodes), or None."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total: dict[str, float] = {}
    for resources in nodes:
        for key, value in resources.items():
            total[key] = total.get(key, 0) + value
    need = spec.total()
    short = {k: v for k, v in need.items() if v > total.get(k, 0) + 1e-9}
    if short:
        have = fmt({k: total.get(k, 0) for k in need})
        return f"the cluster has {have} in all"
    for bundle in [b for b in spec.bundles() if b]:
        if not any(all(n.get(k, 0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
            largest = max(nodes, key=lambda n: n.get("CPU", 0), default={})
            return (
                f"no node can hold a bundle of {fmt(bundle)} (the largest has "
                f"{fmt({k: largest.get(k, 0) for k in bundle})})"
            )
    return None


def _can_grow() -> bool:
    """False for a Ray that no autoscaler can grow: one raymodule started, or one this
    process started itself (``ray.init()`` without an address)."""
    if runtime.started_locally():
        return False
    node = getattr(ray._private.worker, "_global_node", None)
    return not getattr(node, "head", False)


def _wait_for_room(spec: TrialResources, settings: Settings) -> str | None:
    """Asks the cluster for one trial's bundles (a placement group, which an autoscaler
    sees as demand) and waits, bounded, until they could be placed; None if they can."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [b for b in spec.bundles() if b]
    probe = placement_group(bundles, strategy="PACK")
    start = time.monotonic()
    try:
        while True:
            waited = time.monotonic() - start
            left = settings.placement_timeout_s - waited
            if left <= 0:
                return _unfit(spec) or "the cluster did not find room for it"
            ready, _ = ray.wait(
                [probe.ready()], timeout=min(left, settings.placement_report_interval_s)
            )
            if ready or _unfit(spec) is None:
                return None
            log.warning(
                "raymodule.tune: waiting %.0f s for the cluster to grow to hold one trial "
                "(%s); it has %s",
                time.monotonic() - start, spec.describe(), fmt(ray.cluster_resources()),
            )  # fmt: skip
    finally:
        remove_placement_group(probe)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
