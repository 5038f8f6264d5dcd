"""Steps the controller sends to the workers, and where their rows are.

The client puts each worker's part of a chunk of global batches in the object store, one
object per worker per chunk, and hands the controller the references. A worker reads its own
part only. When the group re-forms before a step ran, the step is sent again split for the
new members: each then reads the pieces of the parts that hold its new rows
(:func:`raymodule.worker.actor.assemble`). The controller fetches rows in one case only: the
parts a lost member read, which it copies before they are sent again (:func:`rehome`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data import split_slices

__all__ = ["Piece", "Step", "Chunk", "steps_of", "worker_args", "reads", "rehome"]


@dataclass
class Piece:
    """Rows ``rows`` of a global batch, held as item ``item`` of the object ``ref`` (a list of
    batch parts, one per step of the chunk it was put for)."""

    ref: object
    item: int
    rows: slice


@dataclass
class Step:
    serial: int  # the client's number for it
    mid: int  # the module that runs it
    size: int  # samples in its global batch
    pieces: list[Piece]  # where its rows are, in order
    number: int = 0  # a training step: the steps applied once it is
    slices: list[slice] | None = None  # its split over the members it was last sent to


@dataclass
class Chunk:
    """Steps sent in one call per member; in flight until the calls are read."""

    kind: str
    steps: list[Step]
    refs: list  # the members' calls, in rank order
    slots: list[int]
    generation: int
    reads: dict  # member (actor handle) -> the part objects it was given


def steps_of(spec: dict) -> list[Step]:
    """The steps of a chunk the client sent: ``spec`` holds their ``serials``, ``mids``,
    ``sizes``, how each was split (``slices``: per step, ``(start, stop)`` per part) and the
    parts (``sources``: one object per part, holding that part of every step)."""
    steps = []
    for item, (serial, mid, size, rows) in enumerate(
        zip(spec["serials"], spec["mids"], spec["sizes"], spec["slices"])
    ):
        pieces = [Piece(ref, item, slice(*r)) for ref, r in zip(spec["sources"], rows)]
        steps.append(Step(serial, mid, size, pieces))
    return steps


def worker_args(steps: list[Step], weights: list[list[float]]) -> list[tuple]:
    """Each member's ``(batches, plan)`` for :meth:`ModuleWorker.steps`, the members weighted
    by ``weights[i]`` for step ``i``; sets each step's :attr:`Step.slices`. A member whose
    rows are exactly one part of every step gets that part's object (Ray hands it the part
    itself)."""
    for step, step_weights in zip(steps, weights):
        step.slices = split_slices(step.size, step_weights)
    members = len(weights[0])
    args = []
    for rank in range(members):
        own = [s.pieces[rank] if len(s.pieces) == members else None for s in steps]
        if all(
            p is not None and p.ref == own[0].ref and p.item == i and p.rows == s.slices[rank]
            for i, (p, s) in enumerate(zip(own, steps))
        ):
            args.append((own[0].ref, None))
            continue
        sources: list = []
        plan = []
        for step in steps:
            want = step.slices[rank]
            pieces = []
            for piece in step.pieces:
                start, stop = max(want.start, piece.rows.start), min(want.stop, piece.rows.stop)
                if start >= stop:
                    continue
                if not any(piece.ref == known for known in sources):
                    sources.append(piece.ref)
                index = next(i for i, known in enumerate(sources) if known == piece.ref)
                offset = piece.rows.start
                pieces.append((index, piece.item, start - offset, stop - offset))
            plan.append(pieces)
        args.append((sources, plan))
    return args


def reads(members: list, args: list[tuple]) -> dict:
    """The part objects each of ``members`` reads, given :func:`worker_args`' result."""
    return {
        member: [batches] if plan is None else list(batches)
        for member, (batches, plan) in zip(members, args)
    }


def rehome(steps: list[Step], fresh: dict) -> None:
    """Makes ``steps`` read their rows from ``fresh[ref]`` where they read from ``ref``."""
    for step in steps:
        for piece in step.pieces:
            piece.ref = fresh.get(piece.ref, piece.ref)
