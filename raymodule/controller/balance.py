"""``work_load_list="auto"``: the controller's tally of each member's compute time per sample,
and the weights it splits global batches by.

The workers report, with every chunk of training steps, the seconds they spent computing
(forward, backward and update, without the time they waited for the others' part of the
gradient sums). Every ``every`` training steps the controller asks :func:`.policy.rebalanced`
for new weights: a slower member gets a smaller share of each global batch. The global batch
and its sample order stay the same, so the model does not change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..data.parts import split_slices
from . import policy

__all__ = ["Balancer"]

log = logging.getLogger(__name__)


class Balancer:
    """The weights by slot (1 until adjusted) and the tally since the last adjustment."""

    def __init__(self, every: int):
        self.every = every
        self.weights: dict[int, float] = {}
        self._seconds: dict[int, float] = {}
        self._samples: dict[int, int] = {}
        self._steps = 0

    def weight(self, slot: int) -> float:
        return self.weights.get(slot, 1.0)

    def work_load(self, slots: int) -> list[float]:
        """The weights of every slot, by slot (a ``work_load_list``)."""
        return [self.weight(slot) for slot in range(slots)]

    def record(self, slots: list[int], computing: list[float], shares: list[list[slice]]) -> None:
        """Adds a chunk of training steps: each member's (by ``slots``, in rank order)
        computing seconds, and each step's slices of its global batch (in rank order)."""
        for rank, (slot, seconds) in enumerate(zip(slots, computing, strict=True)):
            self._seconds[slot] = self._seconds.get(slot, 0.0) + seconds
            rows = sum(cut[rank].stop - cut[rank].start for cut in shares)
            self._samples[slot] = self._samples.get(slot, 0) + rows
        self._steps += len(shares)

    def accept(self, change: dict) -> None:
        """Makes the weights of an :meth:`adjust` result the ones the work is split by."""
        self.weights.update(change["weights"])

    def reset(self) -> None:
        """Forgets the tally (the members changed: their shares were others')."""
        self._seconds, self._samples, self._steps = {}, {}, 0

    def adjust(self, slots: list[int], batch_sizes: Sequence[int] = ()) -> dict | None:
        """After ``every`` steps tallied: the members' (``slots``) new weights if the policy
        moves them and every member keeps a sample of each global batch of ``batch_sizes``,
        as ``{"weights": ..., "seconds_per_sample": ...}`` by slot, else None. Starts a new
        tally either way; the weights change once :meth:`accept` is called."""
        if self._steps < self.every:
            return None
        tallied = all(self._samples.get(slot, 0) > 0 for slot in slots)
        per_sample = [self._seconds.get(s, 0.0) / max(self._samples.get(s, 0), 1) for s in slots]
        self.reset()
        if not tallied:
            return None
        moved = policy.rebalanced([self.weight(slot) for slot in slots], per_sample)
        if moved is None:
            return None
        moved = [round(w, 4) for w in moved]
        try:
            for size in batch_sizes:
                split_slices(size, moved)
        except ValueError as err:
            log.info("raymodule controller: work split kept: %s", err)
            return None
        return {
            "weights": dict(zip(slots, moved, strict=True)),
            "seconds_per_sample": {
                slot: round(s, 7) for slot, s in zip(slots, per_sample, strict=True)
            },
        }
