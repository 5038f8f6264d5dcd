"""The cores a CPU worker runs on: each of a node's workers on a core of its own.

Workers that sum through shared memory run in lock step: a rank the kernel moves onto its
peer's core, or puts behind it there, holds up every rank at the next barrier. When a node's
workers of one group are exactly as many as the cores they may run on, each rank pins every
thread of its process to one core: ``RAYMODULE_PIN_CORES``, on by default. On a 2-core
machine (``python jobs/benchmark.py --models mlp,lenet --configs native2,ray2``, pinned and
not, alternating; README, Benchmark), 2 workers trained the MLP 4-9 % faster pinned and
LeNet -2 to +17 %. Fewer workers than cores (other runs, Tune trials or tasks may share the
node) or more (they must share cores anyway) are left to the kernel, as is a group of one.
"""

from __future__ import annotations

import logging
import os

__all__ = ["Pinning", "share"]

log = logging.getLogger(__name__)

_TASKS = "/proc/self/task"  # one entry per thread of this process (Linux)


def share(index: int, count: int, cores: set[int]) -> set[int]:
    """The cores for the ``index``-th of a node's ``count`` workers that may run on ``cores``:
    one of its own when ``count`` is as many as the cores, else all of them."""
    if count < 2 or count != len(cores):
        return set(cores)
    return {sorted(cores)[index]}


class Pinning:
    """This process's threads' cores: the cores it was allowed when it started, and its share
    of them while it is one of a node's workers."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and hasattr(os, "sched_setaffinity") and os.path.isdir(_TASKS)
        self.allowed = set(os.sched_getaffinity(0)) if self.enabled else set()
        self.cores = self.allowed

    def pin(self, index: int, count: int) -> None:
        """Runs every thread of this process on its share of the cores as the ``index``-th of
        the node's ``count`` workers (``count`` 1: all the cores it was allowed)."""
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
            log.debug("worker %d of %d on this node runs on cores %s", index, count, sorted(cores))
            self.cores = cores
