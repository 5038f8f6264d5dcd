"""Who trains: the members of a module family's group at one generation.

The controller's :class:`.group.WorkerGroup` makes one at each re-forming; the controller
keeps the latest and hands it to the client with its replies (only when it changed), and the
client's handle keeps that copy. Nothing else stores membership.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import WorkerLostError

__all__ = ["Membership"]


@dataclass(frozen=True)
class Membership:
    """The members in rank order: ``handles[rank]`` is the worker actor holding slot
    ``slots[rank]`` (a slot is one of the module's contexts) on ``nodes[rank]`` (its
    ``describe()``: node and actor ids, pid and cores' name); ``generation`` counts the group's
    formings; ``pending`` are the slots whose worker (a replacement, or one the run started
    without) is still starting."""

    handles: tuple = ()
    slots: tuple[int, ...] = ()
    nodes: tuple[dict, ...] = ()
    generation: int = 0
    pending: tuple[int, ...] = ()

    @property
    def world_size(self) -> int:
        return len(self.slots)

    def weights(self, work_load_list) -> list:
        """The ``work_load_list`` entries (one per slot) of the members, in rank order."""
        return [work_load_list[slot] for slot in self.slots]

    def rank_of(self) -> dict[int, int]:
        """Each member's rank, by slot."""
        return {slot: rank for rank, slot in enumerate(self.slots)}

    def rank_of_actor(self) -> dict[str, int]:
        """Each member's rank, by its actor's id (as a ``RayActorError`` names it)."""
        return {node["actor"]: rank for rank, node in enumerate(self.nodes) if node.get("actor")}

    def same_as(self, other: Membership | None) -> bool:
        """Whether ``other`` has the same members and pending slots in the same generation."""
        return other is not None and (self.generation, self.slots, self.pending) == (
            other.generation,
            other.slots,
            other.pending,
        )

    def check_generation(self, method: str, generation: int | None) -> None:
        """Raises if ``method``'s per-worker arguments were made for another ``generation``
        (None: for whichever)."""
        if generation not in (None, self.generation):
            raise WorkerLostError(
                f"{method}(): the workers' membership changed (generation {generation} -> "
                f"{self.generation}) since its per-worker arguments were made: call it again"
            )

    def describe_lost(self, lost: dict[int, str], names: list[str]) -> str:
        """Says which members (``lost``: by rank) were lost: each one's rank, context (its
        slot's in ``names``), pid and node."""
        described = []
        for rank in sorted(lost):
            node, slot = self.nodes[rank], self.slots[rank]
            described.append(
                f"worker {rank} ({names[slot]}, pid {node.get('pid', '?')}, "
                f"node {str(node.get('node', '?'))[:8]})"
            )
        return ", ".join(described) + (" was lost" if len(lost) == 1 else " were lost")

    def change_event(
        self, change: str, why: str, before: int, recovery_s: float, failures: int, extra: dict
    ) -> dict:
        """The record of a change to this membership from one of ``before`` members (the
        client logs it and writes it to the run's metrics)."""
        return {
            "event": "membership",
            "change": change,
            "why": why,
            "world_size": self.world_size,
            "previous_world_size": before,
            "generation": self.generation,
            "recovery_s": round(recovery_s, 3),
            "pending": list(self.pending),
            "failures": failures,
            **extra,
        }
