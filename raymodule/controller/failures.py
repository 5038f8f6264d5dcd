"""The controller's failure signals: :class:`StepsFailed`, a broken membership it recovers
from; :class:`EveryWorkerLost`, a loss ``fit`` recovers from, from storage."""

from __future__ import annotations

import time

from ..errors import WorkerLostError

__all__ = ["EveryWorkerLost", "StepsFailed"]


class StepsFailed(Exception):
    """Internal: a call to the workers failed because the membership broke (workers ``lost``
    by rank, with why; or none lost, the group broken by a worker that was late). Raised only
    in an elastic run, which recovers from it."""

    def __init__(
        self,
        method: str,
        lost: dict[int, str],
        broken: str,
        seen_at: float = 0.0,
        slowest: int | None = None,
    ):
        super().__init__(f"{method}: lost {lost or 'no worker'} ({broken})")
        self.method = method
        self.lost = lost
        self.broken = broken
        self.seen_at = seen_at or time.monotonic()  # when the first call failed
        self.slowest = slowest  # the rank whose failed call came back last


class EveryWorkerLost(WorkerLostError):
    """An elastic run lost every worker that held its state: ``fit`` goes on from its latest
    checkpoint, on new workers."""

    during_epoch: int | None = None  # the epoch fit was training, when it was (set by fit)
