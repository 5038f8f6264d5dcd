"""What a worker is sent of a chunk of steps, and the split of a global batch over workers,
in numpy and the standard library only: the controller makes and relays these without
importing MXNet.

- :class:`Batch`: a batch's arrays, or a worker's part of it, as the client puts it in the
  object store;
- :class:`PartPlan`, :class:`IndexedParts`, :class:`StreamParts`: a worker's rows of steps
  sent again to a re-formed group, of a :class:`raymodule.data.DatasetIter`'s steps, and of a
  :class:`raymodule.data.RayDataIter`'s pass;
- :func:`split_slices`: MXNet's work split of a global batch
  (``executor_manager._split_input_slice``), so that N workers see exactly what N devices of
  one MXNet process would.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .datasets import Dataset

__all__ = [
    "Batch",
    "PartPlan",
    "IndexedParts",
    "StreamParts",
    "split_slices",
    "checked_batch_size",
]


def split_slices(batch_size: int, work_load_list: list[float]) -> list[slice]:
    """One slice of the global batch per worker, weighted by ``work_load_list``: MXNet's rule
    (``mxnet.executor_manager._split_input_slice``, which the tests hold this to), written
    out here because the controller splits without MXNet. Each worker gets its weight's share
    rounded, the last one what rounding left over."""
    total = sum(work_load_list)
    sizes = [round(weight * batch_size / total) for weight in work_load_list]
    if sum(sizes) < batch_size:
        sizes[-1] += batch_size - sum(sizes)
    slices, end = [], 0
    for size in sizes:
        begin = min(end, batch_size)
        end = min(begin + size, batch_size)
        if begin >= end:
            raise ValueError(
                f"a batch of {batch_size} samples cannot be split over {len(work_load_list)} "
                f"workers with work_load_list={list(work_load_list)}: some workers would get no "
                f"samples; use a batch of at least {len(work_load_list)} samples (more for "
                "uneven weights)"
            )
        slices.append(slice(int(begin), int(end)))
    return slices


def checked_batch_size(batch_size, who: str) -> int:
    """``batch_size`` as an int, or a ValueError naming ``who`` took it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"{who}: batch_size={batch_size!r} must be an int >= 1")
    if batch_size < 1:
        raise ValueError(f"{who}: batch_size={batch_size} must be >= 1")
    return int(batch_size)


@dataclass
class Batch:
    """A batch as numpy arrays: a global one, or a worker's part of one (:meth:`parts`), which
    is what a worker receives through the object store."""

    data: list[np.ndarray]
    label: list[np.ndarray]
    data_axes: list[int]
    label_axes: list[int]

    def worker_slice(self, part: slice) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return (
            [_take(a, axis, part) for a, axis in zip(self.data, self.data_axes)],
            [_take(a, axis, part) for a, axis in zip(self.label, self.label_axes)],
        )

    def parts(self, slices: list[slice]) -> list[Batch]:
        """One batch per worker holding only its slice: what is sent to that worker."""
        return [Batch(*self.worker_slice(s), self.data_axes, self.label_axes) for s in slices]

    @staticmethod
    def join(pieces: list[Batch]) -> Batch:
        """Consecutive pieces of a batch as one (an input without a batch axis is whole in
        every piece)."""
        first = pieces[0]
        if len(pieces) == 1:
            return first

        def joined(arrays, axes) -> list[np.ndarray]:
            return [
                np.concatenate([p[i] for p in arrays], axis=axis) if axis >= 0 else arrays[0][i]
                for i, axis in enumerate(axes)
            ]

        return Batch(
            joined([p.data for p in pieces], first.data_axes),
            joined([p.label for p in pieces], first.label_axes),
            first.data_axes,
            first.label_axes,
        )


@dataclass
class PartPlan:
    """A worker's rows of steps sent again to a group that re-formed, as pieces of the parts
    put for the split before: ``pieces[i]`` names step ``i``'s rows, in order, as
    ``(source, item, start, stop)``: rows ``start:stop`` of item ``item`` of source object
    ``source`` (see :func:`raymodule.controller.chunks.worker_args`). ``timeout_s``: how long
    the worker waits for those objects (``RAYMODULE_DATA_TIMEOUT_S``)."""

    pieces: list[list[tuple[int, int, int, int]]]
    timeout_s: float


def _take(array: np.ndarray, axis: int, part: slice) -> np.ndarray:
    if axis < 0:
        return array
    index = [slice(None)] * array.ndim
    index[axis] = part
    return array[tuple(index)]


@dataclass
class StreamParts:
    """A worker's rows of consecutive steps of a :class:`raymodule.data.RayDataIter`'s pass: what it
    receives in place of sample bytes. ``split`` is its share of the dataset (a
    ``ray.data.DataIterator`` from ``streaming_split``), ``key`` names the split, ``pass_``
    the pass, ``sizes[i]`` its rows of step ``i`` and ``labels[i]`` whether that step's module
    takes labels; ``timeout_s`` bounds each wait for rows (``RAYMODULE_DATA_TIMEOUT_S``)."""

    key: str
    split: object
    pass_: int
    sizes: list[int]
    labels: list[bool]
    data_names: list[str]
    label_names: list[str]
    timeout_s: float


@dataclass
class IndexedParts:
    """A worker's rows of consecutive steps as dataset indices: what a worker receives in
    place of sample bytes when the data is a :class:`raymodule.data.DatasetIter`
    (``dataset`` travels small: an ``ArrayDataset`` as its object-store reference).
    ``labels[i]``: whether step ``i``'s module takes labels; ``timeout_s``: how long the
    worker waits for one step's rows (``RAYMODULE_DATA_TIMEOUT_S``)."""

    dataset: Dataset
    indices: list[np.ndarray]
    labels: list[bool]
    timeout_s: float

    def batches(self) -> Iterator[Batch]:
        """The worker's part of each step, read from the dataset in one background thread
        that reads a step ahead: step ``i + 1``'s rows are read while the caller computes
        step ``i``. Each wait for a step's rows is bounded by ``timeout_s``; past it,
        TimeoutError names the step and the dataset (a read that hangs is left to its
        thread)."""
        reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raymodule-read")
        try:
            ahead = [reader.submit(self._read, 0)] if self.indices else []
            for i in range(len(self.indices)):
                if i + 1 < len(self.indices):
                    ahead.append(reader.submit(self._read, i + 1))
                yield self._wait(ahead.pop(0), i)
        finally:
            reader.shutdown(wait=False, cancel_futures=True)

    def _read(self, i: int) -> Batch:
        return self.dataset.batch(self.indices[i], self.labels[i])

    def _wait(self, read: concurrent.futures.Future, i: int) -> Batch:
        try:
            return read.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"the {len(self.indices[i])} rows of step {i} of this call were not read from "
                f"{self.dataset!r} within {self.timeout_s:g} s (RAYMODULE_DATA_TIMEOUT_S)"
            ) from None
