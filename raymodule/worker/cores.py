"""The cores a CPU worker runs on: each of a machine's workers on a core of its own.

Workers that sum through shared memory or gloo run in lock step: a rank the kernel moves onto
its peer's core, or puts behind it there, holds up every rank at the next barrier. When a
group's workers that share a machine's cores are exactly as many as those cores, each rank
pins every thread of its process to one core: ``RAYMODULE_PIN_CORES``, on by default. On a
2-core machine (``python jobs/benchmark.py --models mlp,lenet --configs native2,ray2``, pinned
and not, alternating; docs/performance.md), 2 workers trained the MLP 4-9 % faster pinned and
LeNet -2 to +17 %. Fewer workers than cores (other runs, Tune trials or tasks may share the
machine) or more (they must share cores anyway) are left to the kernel, as is a group of one.

The workers counted are those on the same cores (:func:`cores_name`), not those of one Ray
node: several Ray nodes on one machine (``ray.cluster_utils.Cluster``, a cluster simulated on
one host) share its cores, and pinning each node's workers to a core each would put ranks of
different nodes on the same core while the machine's other cores idle.
"""

from __future__ import annotations

import logging
import os

__all__ = ["Pinning", "cores_name", "places", "share"]

log = logging.getLogger(__name__)

_TASKS = "/proc/self/task"  # one entry per thread of this process (Linux)
_BOOT_ID = "/proc/sys/kernel/random/boot_id"  # the running kernel's: one machine (Linux)


def cores_name(cores: set[int]) -> str | None:
    """``cores`` of this machine, named machine-wide: the kernel's boot id and the cores'
    numbers. Processes that may run on cores of the same name compete for them; None where
    it cannot be known (no Linux ``/proc``, no cores given)."""
    try:
        with open(_BOOT_ID) as source:
            machine = source.read().strip()
    except OSError:
        return None
    return f"{machine}:{','.join(map(str, sorted(cores)))}" if cores else None


def places(names: list[str | None]) -> list[tuple[int, int]]:
    """Each of a group's workers (in rank order, by :func:`cores_name`) as ``(index, count)``:
    its place among the workers of the same name, and how many they are. A worker whose
    cores are not known is alone: ``(0, 1)``."""
    return [
        (names[:rank].count(name), names.count(name)) if name is not None else (0, 1)
        for rank, name in enumerate(names)
    ]


def share(index: int, count: int, cores: set[int]) -> set[int]:
    """The cores for the ``index``-th of ``count`` workers that may run on ``cores``:
    one of its own when ``count`` is as many as the cores, else all of them."""
    if count < 2 or count != len(cores):
        return set(cores)
    return {sorted(cores)[index]}


class Pinning:
    """This process's threads' cores: the cores it was allowed when it started, and its share
    of them while it is one of a group's workers on those cores."""

    def __init__(self, enabled: bool):
        known = hasattr(os, "sched_getaffinity")
        self.enabled = enabled and known and os.path.isdir(_TASKS)
        self.allowed = set(os.sched_getaffinity(0)) if known else set()
        self.cores = self.allowed

    def pin(self, index: int, count: int) -> None:
        """Runs every thread of this process on its share of the cores as the ``index``-th of
        the ``count`` workers of its group on them (``count`` 1: all the cores it was
        allowed)."""
        if not self.enabled:
            return
        cores = share(index, count, self.allowed)
        if cores != self.cores:
            moved: set[str] = set()
            # threads started later inherit their starter's cores; one started meanwhile by a
            # thread not moved yet is found by the next pass
            while new := set(os.listdir(_TASKS)) - moved:
                for tid in new:
                    try:
                        os.sched_setaffinity(int(tid), cores)
                    except ProcessLookupError:
                        pass  # the thread ended meanwhile
                moved |= new
            log.debug("worker %d of %d on these cores runs on %s", index, count, sorted(cores))
            self.cores = cores
