"""Datasets the workers read themselves, and the iterator that walks them.

A :class:`Dataset` is what a :class:`DatasetIter` walks and a worker reads: its length, the
names and shapes of its inputs, its samples by index, and a key a worker caches it by. Two
kinds: an :class:`ArrayDataset` (below) and a
:class:`raymodule.data.recordio.RecordIODataset` (MXNet indexed RecordIO files).

An :class:`ArrayDataset` holds arrays (numpy or NDArray, one or a dict of them per side) and
is put in Ray's object store once, the first time raymodule needs it there
(:meth:`ArrayDataset.ref`); a worker reads it back without a copy. Plain MXNet use needs no
Ray.

A :class:`DatasetIter` is a real ``mx.io.DataIter`` over one: ``mx.mod.Module.fit`` in one
process iterates it as it iterates an ``NDArrayIter``. Its sample order is a function of its
``seed`` and pass number only: pass ``k`` (the ``reset()`` calls so far; under ``fit``, the
epoch) visits :func:`pass_order` ``(n, shuffle, seed, k)``, which is
``numpy.random.default_rng([seed, k]).permutation(n)`` when shuffling, else ``0 .. n-1``;
global batch ``b`` is positions ``[b * batch_size, (b + 1) * batch_size)`` of that order. The
last batch is handled exactly as ``mx.io.NDArrayIter`` handles it (``pad``: filled from the
start of the pass's order; ``discard``; ``roll_over``: its samples open the next pass, which is
then shifted by as many). Batches hold what ``NDArrayIter`` would: numpy arrays become
float32 NDArrays, NDArrays keep their dtype.
"""

from __future__ import annotations

from collections.abc import Hashable

import mxnet as mx
import numpy as np
from mxnet.io import DataBatch, DataDesc, DataIter

from ..constants import Settings
from .parts import Batch, checked_batch_size

__all__ = [
    "Dataset",
    "ArrayDataset",
    "DatasetIter",
    "index_batch",
    "pass_order",
    "LAST_BATCH_HANDLES",
]

LAST_BATCH_HANDLES = ("pad", "discard", "roll_over")


def pass_order(n: int, shuffle: bool, seed: int, k: int) -> np.ndarray:
    """The sample indices pass ``k`` of a :class:`DatasetIter` visits, in order."""
    if shuffle:
        return np.random.default_rng([seed, k]).permutation(n)
    return np.arange(n)


def _side(arrays, what: str) -> tuple[list[str] | None, list[np.ndarray], list]:
    """``(names or None for one unnamed array, arrays as numpy, the dtype of their batches)``."""
    if arrays is None:
        return None, [], []
    named = isinstance(arrays, dict)
    items = sorted(arrays.items()) if named else [(None, arrays)]  # NDArrayIter sorts by name
    if named and not items:
        raise ValueError(f"ArrayDataset: {what}={{}} holds no arrays")
    values, dtypes = [], []
    for name, array in items:
        where = f"{what}[{name!r}]" if named else what
        if isinstance(array, mx.nd.NDArray):
            if array.stype != "default":
                raise TypeError(f"ArrayDataset: {where} is a {array.stype} NDArray; dense only")
            values.append(array.asnumpy())
            dtypes.append(array.dtype)  # NDArrayIter keeps an NDArray's dtype
        elif isinstance(array, np.ndarray):
            values.append(array)
            dtypes.append(np.float32)  # NDArrayIter makes numpy arrays mx.nd.array: float32
        else:
            raise TypeError(
                f"ArrayDataset: {where} is a {type(array).__name__}; expected a numpy array, "
                "an mx.nd.NDArray or a dict of them by input name"
            )
        if values[-1].ndim == 0:
            raise ValueError(f"ArrayDataset: {where} is a scalar; it needs a sample axis")
    return ([str(name) for name, _ in items] if named else None), values, dtypes


def from_store(ref, what: str):
    """The object ``ref`` from Ray's object store (what a dataset's copy on a worker reads
    once), or TimeoutError saying ``what`` was not read. Bounded by RAYMODULE_DATA_TIMEOUT_S's
    default, so that the thread that reads ends; a worker's wait for that thread is bounded by
    the run's own value (:meth:`IndexedParts.batches`)."""
    import ray

    timeout_s = Settings.data_timeout_s
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"{what} were not read from the object store within {timeout_s:g} s"
        ) from None


class Dataset:
    """Samples read by index: what a :class:`DatasetIter` walks, and what a worker reads its
    rows of each step from under ``fit`` and ``score``.

    A dataset has ``len()`` samples; ``data_names`` and ``label_names`` (its inputs' names, or
    None for one unnamed input per side, which the iterator names); ``data_descs`` and
    ``label_descs`` (each input's sample shape and the dtype of its batches; no labels: an
    empty list). It travels to the workers with every call, so it must pickle small; a worker
    keeps the copy it first received by :meth:`key` and reads from that one.
    """

    data_names: list[str] | None
    label_names: list[str] | None
    data_descs: list[tuple[tuple, object]]
    label_descs: list[tuple[tuple, object]]

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self) -> Hashable:
        """What stays the same across this dataset's pickled copies, and differs from every
        other dataset's: a worker reads from the first copy of it it received."""
        raise NotImplementedError

    def take(self, indices: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The samples at ``indices`` (in that order): ``(data, label)`` arrays."""
        raise NotImplementedError

    def batch(self, indices: np.ndarray, labels: bool = True) -> Batch:
        """The samples at ``indices`` as a :class:`Batch` in the dtypes of a
        :class:`DatasetIter`'s batches (its batch axis is 0), without labels if not ``labels``."""
        data, label = self.take(indices)
        return Batch(
            [a.astype(t, copy=False) for a, (_, t) in zip(data, self.data_descs)],
            [a.astype(t, copy=False) for a, (_, t) in zip(label, self.label_descs)]
            if labels
            else [],
            [0] * len(data),
            [0] * len(label) if labels else [],
        )


class ArrayDataset(Dataset):
    """Samples in arrays, read by index. ``data`` and ``label`` are each a numpy array, an
    ``mx.nd.NDArray`` or a dict of them by input name (several inputs or labels); every array
    holds one sample per entry of its first axis, and all hold as many.

    Put in Ray's object store once, when raymodule first needs it there (:meth:`ref`); the
    workers read it without a copy. Pickled before that, it carries its arrays; after, only
    the reference.
    """

    def __init__(self, data, label=None):
        if data is None:
            raise ValueError("ArrayDataset: data is required")
        self.data_names, self._data, data_dtypes = _side(data, "data")
        self.label_names, self._label, label_dtypes = _side(label, "label")
        sides = [("data", self.data_names, self._data), ("label", self.label_names, self._label)]
        lengths = {}
        for what, names, arrays in sides:
            for i, array in enumerate(arrays):
                lengths[f"{what}[{names[i]!r}]" if names else what] = len(array)
        if len(set(lengths.values())) > 1:
            said = ", ".join(f"{name} has {n}" for name, n in lengths.items())
            raise ValueError(f"ArrayDataset: the arrays disagree in length: {said} samples")
        self._length = next(iter(lengths.values()))
        if self._length == 0:
            raise ValueError("ArrayDataset: the arrays hold no samples")
        # each input's sample shape and the dtype of its batches, known without the arrays
        self.data_descs = [(a.shape[1:], t) for a, t in zip(self._data, data_dtypes)]
        self.label_descs = [(a.shape[1:], t) for a, t in zip(self._label, label_dtypes)]
        self._ref = None

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        where = "in the object store" if self._ref is not None else "local"
        return (
            f"ArrayDataset({self._length} samples, data {self.data_descs}, "
            f"label {self.label_descs or 'none'}, {where})"
        )

    def _arrays(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self._data is None:  # unpickled from its reference: read it (zero-copy) once
            self._data, self._label = from_store(self._ref, f"{self!r}: its arrays")
        return self._data, self._label

    @property
    def data(self) -> list[np.ndarray]:
        """The data arrays, sorted by name (as ``mx.io.NDArrayIter`` orders a dict)."""
        return self._arrays()[0]

    @property
    def label(self) -> list[np.ndarray]:
        """The label arrays, sorted by name; empty without labels."""
        return self._arrays()[1]

    def ref(self):
        """The dataset's arrays in Ray's object store (put there on the first call)."""
        if self._ref is None:
            import ray

            self._ref = ray.put((self._data, self._label))
        return self._ref

    def key(self):
        """The dataset's object-store reference (put there on the first call)."""
        return self.ref()

    def take(self, indices: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The samples at ``indices`` (in that order): ``(data, label)`` arrays."""
        data, label = self._arrays()
        return [a[indices] for a in data], [a[indices] for a in label]

    def __reduce__(self):
        if self._ref is None:
            return _rebuild, (self.__dict__,)
        state = dict(self.__dict__, _data=None, _label=None)
        return _rebuild, (state,)


def _rebuild(state: dict) -> ArrayDataset:
    dataset = ArrayDataset.__new__(ArrayDataset)
    dataset.__dict__.update(state)
    return dataset


class DatasetIter(DataIter):
    """An ``mx.io.DataIter`` over a :class:`Dataset` (an :class:`ArrayDataset` or a
    :class:`raymodule.data.RecordIODataset`) whose order depends only on ``seed``
    and the pass: pass ``k`` (the ``reset()`` calls so far) visits :func:`pass_order`; the
    last batch follows ``last_batch_handle`` as in ``mx.io.NDArrayIter``. Inputs are named
    ``data_name`` and ``label_name``, or by the dataset's dict keys when it has them.
    ``getindex()`` gives the dataset indices of the current batch (padding included).

    Under ``raymodule.Module.fit`` and ``score`` the same global batches are trained whatever
    the number of workers, and the client reads no samples: each step sends every worker its
    slice of the batch's indices and the worker reads its rows from the dataset in the object
    store. The callbacks' ``data_batch`` then holds the batch's ``index``, ``pad`` and
    ``provide_data``/``provide_label``, not its arrays (:func:`index_batch`). A metric that
    is not additive (F1, ...) is updated in the client on the outputs gathered from the
    workers and the labels of those indices, read from the client's own dataset.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        last_batch_handle: str = "pad",
        data_name: str = "data",
        label_name: str = "softmax_label",
    ):
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"DatasetIter: dataset is a {type(dataset).__name__}; expected a "
                "raymodule.data.ArrayDataset or a raymodule.data.RecordIODataset"
            )
        batch_size = checked_batch_size(batch_size, "DatasetIter")
        if last_batch_handle not in LAST_BATCH_HANDLES:
            raise ValueError(
                f"DatasetIter: last_batch_handle={last_batch_handle!r} must be one of "
                f"{', '.join(map(repr, LAST_BATCH_HANDLES))}"
            )
        super().__init__(batch_size)
        self.dataset = dataset
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.last_batch_handle = last_batch_handle
        self.num_data = len(dataset)
        self.data_names = dataset.data_names or [data_name]
        self.label_names = (dataset.label_names or [label_name]) if dataset.label_descs else []
        self.epoch = 0  # the pass: reset() calls so far
        self._order = pass_order(self.num_data, self.shuffle, self.seed, self.epoch)
        self.cursor = -self.batch_size
        self._cache = None  # roll_over: the indices the last pass left over
        self._index = None  # the current batch's indices
        self._pad = 0

    def _descs(self, names, descs) -> list[DataDesc]:
        return [
            DataDesc(name, (self.batch_size,) + tuple(shape), dtype, layout="NCHW")
            for name, (shape, dtype) in zip(names, descs)
        ]

    @property
    def provide_data(self) -> list[DataDesc]:
        return self._descs(self.data_names, self.dataset.data_descs)

    @property
    def provide_label(self) -> list[DataDesc]:
        return self._descs(self.label_names, self.dataset.label_descs)

    def reset(self) -> None:
        """Starts the next pass (with ``roll_over``, after the samples the last one left)."""
        self.epoch += 1
        self._order = pass_order(self.num_data, self.shuffle, self.seed, self.epoch)
        n, size = self.num_data, self.batch_size
        if self.last_batch_handle == "roll_over" and n - size < self.cursor < n:
            self.cursor = self.cursor - n - size  # as NDArrayIter: the next batch starts early
        else:
            self.cursor = -size

    def hard_reset(self) -> None:
        """Starts the next pass, dropping what ``roll_over`` left over."""
        self.epoch += 1
        self._order = pass_order(self.num_data, self.shuffle, self.seed, self.epoch)
        self.cursor = -self.batch_size
        self._cache = None

    def begin_pass(self, k: int) -> None:
        """Starts pass ``k`` as if ``reset()`` had been called ``k`` times, without what
        ``roll_over`` left over (``fit`` restarting from a checkpoint goes back to its epoch's
        pass)."""
        self.epoch = k
        self._order = pass_order(self.num_data, self.shuffle, self.seed, self.epoch)
        self.cursor = -self.batch_size
        self._cache = None

    def iter_next(self) -> bool:
        self.cursor += self.batch_size
        return self.cursor < self.num_data

    def next_indices(self) -> tuple[np.ndarray, int]:
        """The dataset indices of the next batch and its pad (``StopIteration`` at the end of
        the pass); what :meth:`next` reads."""
        if not self.iter_next():
            raise StopIteration
        n, size, cursor = self.num_data, self.batch_size, self.cursor
        if self.last_batch_handle == "roll_over" and -size < cursor < 0:
            left, self._cache = self._cache, None
            assert left is not None, "roll_over: the pass before left no samples"
            index, pad = np.concatenate([left, self._order[: cursor + size]]), -cursor
        elif self.last_batch_handle == "pad" and cursor + size > n:
            # NDArrayIter fills from the start of the pass's order, tiling it if need be
            index, pad = self._order[np.arange(cursor, cursor + size) % n], cursor + size - n
        else:
            index, pad = self._order[cursor : min(cursor + size, n)], 0
        if len(index) != size:  # an incomplete last batch: kept for roll_over, never given
            self._cache = index
            raise StopIteration
        self._index, self._pad = index, pad
        return index, pad

    def next(self) -> DataBatch:
        index, pad = self.next_indices()
        data, label = self.dataset.take(index)
        return DataBatch(
            data=self._arrays(data, self.dataset.data_descs),
            label=self._arrays(label, self.dataset.label_descs),
            pad=pad,
            index=index,
        )

    @staticmethod
    def _arrays(arrays, descs) -> list[mx.nd.NDArray]:
        return [mx.nd.array(a, dtype=dtype) for a, (_, dtype) in zip(arrays, descs)]

    def getdata(self) -> list[mx.nd.NDArray]:
        return self._arrays(self.dataset.take(self._index)[0], self.dataset.data_descs)

    def getlabel(self) -> list[mx.nd.NDArray]:
        return self._arrays(self.dataset.take(self._index)[1], self.dataset.label_descs)

    def getindex(self) -> np.ndarray | None:
        return self._index

    def batch_of(self, index: np.ndarray, pad: int) -> DataBatch:
        """What ``fit``/``score`` give the callbacks for the batch at ``index``, whose
        samples the workers read: :func:`index_batch`."""
        return index_batch(index, pad, self)

    def getpad(self) -> int:
        return self._pad


def index_batch(index: np.ndarray, pad: int, data_iter: DatasetIter) -> DataBatch:
    """What ``fit``/``score`` give the callbacks as ``data_batch`` for a :class:`DatasetIter`
    whose samples the workers read: its ``index`` and ``pad``, and its shapes as
    ``provide_data``/``provide_label``; ``data`` and ``label`` are None (the arrays are read
    on the workers, never in the client)."""
    return DataBatch(
        data=None,
        label=None,
        pad=pad,
        index=index,
        provide_data=data_iter.provide_data,
        provide_label=data_iter.provide_label,
    )
