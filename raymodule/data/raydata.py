"""A Ray Dataset as training data: each worker streams its own share of it.

A :class:`RayDataIter` is an ``mx.io.DataIter`` over a ``ray.data.Dataset``. In one process
(plain MXNet) it iterates ``dataset.iter_batches``. Under raymodule's ``fit``, ``score`` and
``predict`` no sample passes through the client: the controller splits the dataset with
``Dataset.streaming_split(world size, equal=True, locality_hints=<each worker's node>)``, so
that Ray Data reads and preprocesses on the cluster and hands each worker blocks near it, and
every worker reads its share of each global batch from its own split
(:class:`StreamParts`, read by a :class:`StreamReader` kept on the worker).

The order of the rows is Ray Data's streaming order, not a function of a seed, so this path
is *epoch-granular* where :class:`raymodule.data.DatasetIter` is step-exact:

- a pass (``reset()``; under ``fit``, an epoch) reads the dataset once over all workers, in
  ``batches_per_pass`` global batches; rows that do not fill one are dropped (``equal=True``
  splits drop up to ``workers - 1`` more);
- a membership change during a pass (a lost worker, or one that leaves) cannot re-split the
  streams mid-pass: an elastic run then restarts its workers from its latest checkpoint, and a
  pass resumed in its middle trains its remaining batches on a fresh pass over the dataset
  (rows of that epoch may be trained twice or not at all);
- metrics are computed on the workers (accuracy, cross-entropy, ...); one that needs every
  label in the client (F1, ...) is refused, as the client never holds them.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Iterator

import mxnet as mx
import numpy as np
from mxnet.io import DataBatch, DataDesc, DataIter

from .parts import Batch, StreamParts, checked_batch_size

__all__ = ["RayDataIter", "StreamReader"]


def _names(value, what: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"RayDataIter: {what}={value!r} must be a column name or a list of them")
    return names


class RayDataIter(DataIter):
    """An ``mx.io.DataIter`` over a ``ray.data.Dataset`` whose rows hold the inputs as columns:
    ``data_name`` (one column name, or a list for several inputs) and ``label_name`` (None
    for none). Batches are float32 (as ``mx.io.NDArrayIter`` makes numpy arrays), of
    ``batch_size`` rows; the dataset's rows are counted once, here (which may run its
    pipeline), and one row is read to learn each column's shape.

    Under raymodule each worker streams its own share (see the module's docstring: which rows
    a pass visits is Ray Data's order, and a membership change in a pass restarts it from the
    latest checkpoint)."""

    def __init__(self, dataset, batch_size: int, data_name="data", label_name="softmax_label"):
        import ray.data

        if not isinstance(dataset, ray.data.Dataset):
            raise TypeError(
                f"RayDataIter: dataset is a {type(dataset).__name__}; expected a "
                "ray.data.Dataset (for arrays, use raymodule.data.ArrayDataset and DatasetIter)"
            )
        batch_size = checked_batch_size(batch_size, "RayDataIter")
        super().__init__(batch_size)
        self.dataset = dataset
        self.data_names = _names(data_name, "data_name")
        self.label_names = _names(label_name, "label_name")
        if not self.data_names:
            raise ValueError("RayDataIter: data_name names no column")
        self.num_data = dataset.count()
        if self.num_data < batch_size:
            raise ValueError(
                f"RayDataIter: the dataset has {self.num_data} rows, fewer than one batch of "
                f"{batch_size}"
            )
        first = dataset.take_batch(1, batch_format="numpy")
        missing = [n for n in self.data_names + self.label_names if n not in first]
        if missing:
            raise ValueError(
                f"RayDataIter: the dataset has no column {', '.join(map(repr, missing))}; its "
                f"columns are {', '.join(map(repr, sorted(first)))}"
            )
        self.shapes = {name: tuple(np.asarray(first[name]).shape[1:]) for name in first}
        self.key = uuid.uuid4().hex  # names this iterator's streams on the workers
        self.epoch = 0  # the pass: reset() calls so far
        self._rows = None

    @property
    def provide_data(self) -> list[DataDesc]:
        return [self._desc(n) for n in self.data_names]

    @property
    def provide_label(self) -> list[DataDesc]:
        return [self._desc(n) for n in self.label_names]

    def _desc(self, name: str) -> DataDesc:
        return DataDesc(name, (self.batch_size,) + self.shapes[name], np.float32)

    def batches_per_pass(self, shares: list[int]) -> int:
        """Global batches in a pass when the workers' shares of each are ``shares`` rows (one
        process: ``[batch_size]``): as many as the smallest split fills."""
        per_split = self.num_data // len(shares)
        return min(per_split // share for share in shares)

    def reset(self) -> None:
        self.epoch += 1
        self._rows = None

    def next(self) -> DataBatch:
        if self._rows is None:
            self._rows = iter(
                self.dataset.iter_batches(
                    batch_size=self.batch_size, batch_format="numpy", drop_last=True
                )
            )
        columns = next(self._rows)  # StopIteration ends the pass
        batch = to_batch(columns, self.data_names, self.label_names)
        return DataBatch(
            data=[mx.nd.array(a) for a in batch.data],
            label=[mx.nd.array(a) for a in batch.label],
            pad=0,
        )


def to_batch(columns: dict, data_names: list[str], label_names: list[str]) -> Batch:
    """Ray Data's numpy batch (a dict of columns) as a :class:`Batch` of float32 arrays."""

    def arrays(names):
        return [np.ascontiguousarray(columns[n], dtype=np.float32) for n in names]

    return Batch(arrays(data_names), arrays(label_names), [0] * len(data_names),
                 [0] * len(label_names))  # fmt: skip


class StreamReader:
    """A worker's reading of one split: the pass it is in and where in it, kept from call to
    call. Reads in a thread of its own, so that every wait is bounded."""

    def __init__(self):
        self._at = None  # (key, pass, rows per step)
        self._rows = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="raymodule-ray-data"
        )

    def batches(self, parts: StreamParts) -> Iterator[Batch]:
        """The worker's part of each step of ``parts``, read from its split."""
        for i, size in enumerate(parts.sizes):
            at = (parts.key, parts.pass_, size)
            if at != self._at:
                if self._at is not None and self._at[:2] == at[:2]:
                    raise ValueError(
                        f"a worker's share of a step of a Ray Dataset changed from "
                        f"{self._at[2]} to {size} rows in the middle of a pass"
                    )
                self._at = at
                self._rows = iter(
                    parts.split.iter_batches(batch_size=size, batch_format="numpy", drop_last=True)
                )
            read = self._pool.submit(next, self._rows, None)
            try:
                columns = read.result(timeout=parts.timeout_s)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(
                    f"{size} rows of step {i} of this call were not read from this worker's "
                    f"split of the Ray Dataset within {parts.timeout_s:g} s "
                    "(RAYMODULE_DATA_TIMEOUT_S)"
                ) from None
            if columns is None:
                raise ValueError(
                    f"this worker's split of the Ray Dataset ran out at step {i} of this call "
                    f"(pass {parts.pass_}): the splits hold fewer rows than the steps sent"
                )
            yield to_batch(columns, parts.data_names, parts.label_names if parts.labels[i] else [])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
