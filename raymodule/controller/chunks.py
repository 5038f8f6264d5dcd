"""Steps the controller sends to the workers, and where their rows are.

The client puts each worker's part of a chunk of global batches in the object store, one
object per worker per chunk, and hands the controller the references. A worker reads its own
part only. When the group re-forms before a step ran, the step is sent again split for the
new members: each then reads the pieces of the parts that hold its new rows
(:func:`raymodule.worker.actor.assemble`). The controller fetches rows in one case only: the
parts a lost member read, which it copies before they are sent again (:func:`rehome`).

Steps of a :class:`raymodule.data.DatasetIter` carry no parts: each holds its global batch's
dataset indices, and each member gets its slice of them (:class:`raymodule.data.IndexedParts`)
and reads its rows from the dataset itself. Sent again, they are only re-sliced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from ..data.parts import IndexedParts, PartPlan, StreamParts, split_slices

__all__ = [
    "Piece", "Step", "Chunk", "steps_per_call", "steps_of", "worker_args", "reads", "rehome"
]  # fmt: skip

log = logging.getLogger(__name__)


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
    indices: object = None  # a dataset's step: its global batch's dataset indices (no pieces)
    dataset: object = None  # ... that dataset (a raymodule.data.Dataset, sealed)
    labels: bool = True  # ... whether its module takes labels
    stream: dict | None = None  # a Ray Dataset's step: its pass (see steps_of; no pieces)
    position: int = 0  # ... its batch number in the pass


@dataclass
class Chunk:
    """Steps sent in one call per member; in flight until the calls are read."""

    kind: str
    steps: list[Step]
    refs: list  # the members' calls, in rank order
    slots: list[int]
    generation: int
    reads: dict  # member (actor handle) -> the part objects it was given
    loop: str | None = None  # the client's step loop that sent it (its results are its own)


def steps_per_call(settings, step_s: float | None) -> int:
    """Batches in the next call: as many as take the workers about ``RAYMODULE_CALL_S``
    (``step_s``: a step's seconds, as last measured), at least 1, at most
    ``RAYMODULE_STEPS_PER_CALL``; 4 at most before a step was timed."""
    most = settings.steps_per_call
    if not step_s:
        return min(4, most)
    return max(1, min(most, round(settings.call_s / step_s)))


def steps_of(spec: dict) -> list[Step]:
    """The steps of a chunk the client sent: ``spec`` holds their ``serials``, ``mids``,
    ``sizes``, how each was split (``slices``: per step, ``(start, stop)`` per part) and the
    parts (``sources``: one object per part, holding that part of every step); or, for a
    dataset's steps, instead of ``sources``: the ``dataset``, each step's global batch's
    ``indices`` and whether its module takes ``labels``."""
    if "stream" in spec:
        stream = {k: v for k, v in spec["stream"].items() if k != "positions"}
        return [
            Step(serial, mid, size, [], labels=labels, stream=stream, position=position)
            for serial, mid, size, labels, position in zip(
                spec["serials"], spec["mids"], spec["sizes"], spec["labels"],
                spec["stream"]["positions"],
            )
        ]  # fmt: skip
    if "indices" in spec:
        return [
            Step(serial, mid, size, [], indices=index, dataset=spec["dataset"], labels=labels)
            for serial, mid, size, index, labels in zip(
                spec["serials"], spec["mids"], spec["sizes"], spec["indices"], spec["labels"]
            )
        ]
    steps = []
    for item, (serial, mid, size, rows) in enumerate(
        zip(spec["serials"], spec["mids"], spec["sizes"], spec["slices"])
    ):
        pieces = [Piece(ref, item, slice(*r)) for ref, r in zip(spec["sources"], rows)]
        steps.append(Step(serial, mid, size, pieces))
    return steps


def worker_args(
    steps: list[Step], weights: list[list[float]], data_timeout_s: float, split=None
) -> list[tuple]:
    """Each member's ``(batches, plan)`` for :meth:`ModuleWorker.steps`, the members weighted
    by ``weights[i]`` for step ``i``; sets each step's :attr:`Step.slices`. A member whose
    rows are exactly one part of every step gets that part's object (Ray hands it the part
    itself); otherwise the sources it reads and a :class:`raymodule.data.PartPlan`. For a Ray
    Dataset's steps, ``split`` is ``(key, shares)``: member ``rank`` streams from
    ``shares[rank]`` (:class:`raymodule.data.StreamParts`). Waits for rows are bounded by
    ``data_timeout_s``."""
    for step, step_weights in zip(steps, weights):
        step.slices = split_slices(step.size, step_weights)
    members = len(weights[0])
    if steps[0].stream is not None:  # a Ray Dataset's: each member streams from its split
        stream, (key, shares) = steps[0].stream, split
        return [
            (
                StreamParts(
                    key,
                    shares[rank],
                    stream["pass"],
                    [step.slices[rank].stop - step.slices[rank].start for step in steps],
                    [step.labels for step in steps],
                    stream["data_names"],
                    stream["label_names"],
                    data_timeout_s,
                ),
                None,
            )
            for rank in range(members)
        ]
    if steps[0].indices is not None:  # a dataset's steps: each member's slice of the indices
        return [
            (
                IndexedParts(
                    steps[0].dataset,
                    [step.indices[step.slices[rank]] for step in steps],
                    [step.labels for step in steps],
                    data_timeout_s,
                ),
                None,
            )
            for rank in range(members)
        ]
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
        args.append((sources, PartPlan(plan, data_timeout_s)))
    return args


def reads(members: list, args: list[tuple]) -> dict:
    """The part objects each of ``members`` reads, given :func:`worker_args`' result (none
    for a dataset's steps: the dataset is the client's object, not a part to copy)."""
    return {
        member: [] if isinstance(batches, (IndexedParts, StreamParts)) else [batches]
        if plan is None
        else list(batches)
        for member, (batches, plan) in zip(members, args)
    }  # fmt: skip


def rehome(steps: list[Step], refs: set, timeout_s: float) -> None:
    """Copies the parts ``refs`` (those lost members read) into objects of the caller's own
    (the controller's), and makes ``steps`` read from the copies, before they are sent again.
    Ray lists every node that fetched an object as a place to fetch it from; a survivor that
    picks a lost node waits out Ray's pull timeout (``object_manager_pull_timeout_ms``, 10 s)
    before it tries another, and is then declared silent. The controller runs beside the
    client, whose node holds the first copy: reading it is local there. Bounded by
    ``timeout_s``; on a timeout, or when Ray cannot read or copy them (no room in the object
    store or its spill disk), the steps are sent with the parts as they are."""
    if not refs:
        return
    refs = list(refs)
    try:
        parts = ray.get(refs, timeout=timeout_s)
        copies = {ref: ray.put(part) for ref, part in zip(refs, parts)}
    except ray.exceptions.RayError as err:
        log.warning("the lost members' parts were not copied (%s); sent as they are", err)
        return
    for step in steps:
        for piece in step.pieces:
            piece.ref = copies.get(piece.ref, piece.ref)
