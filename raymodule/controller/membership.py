"""Who trains: the members of a module family's group at one generation.

The controller's :class:`.group.WorkerGroup` makes one at each re-forming; the controller
keeps the latest and hands it to the client with its replies (only when it changed), and the
client's handle keeps that copy. Nothing else stores membership.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Membership"]


@dataclass(frozen=True)
class Membership:
    """The members in rank order: ``handles[rank]`` is the worker actor holding slot
    ``slots[rank]`` (a slot is one of the module's contexts) on ``nodes[rank]`` (its
    ``describe()``: node id, pid and cores' name); ``generation`` counts the group's
    formings; ``pending`` are the slots whose worker (a replacement, or one the run started
    without) is still starting;
    ``placement_groups`` are those the controller made for them (none in a Tune trial, which
    brings its own), which the client removes if the controller dies."""

    handles: tuple = ()
    slots: tuple[int, ...] = ()
    nodes: tuple[dict, ...] = ()
    generation: int = 0
    pending: tuple[int, ...] = ()
    placement_groups: tuple = ()

    @property
    def world_size(self) -> int:
        return len(self.slots)

    def weights(self, work_load_list) -> list:
        """The ``work_load_list`` entries (one per slot) of the members, in rank order."""
        return [work_load_list[slot] for slot in self.slots]

    def rank_of(self) -> dict[int, int]:
        """Each member's rank, by slot."""
        return {slot: rank for rank, slot in enumerate(self.slots)}

    def same_as(self, other: Membership | None) -> bool:
        """Whether ``other`` has the same members and pending slots in the same generation."""
        return other is not None and (self.generation, self.slots, self.pending) == (
            other.generation,
            other.slots,
            other.pending,
        )
