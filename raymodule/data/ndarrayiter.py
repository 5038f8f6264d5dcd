"""An ``mx.io.NDArrayIter`` given to ``fit`` read as a dataset: the workers read its rows.

:func:`rows_of` wraps a plain ``NDArrayIter`` over dense arrays in an :class:`NDArrayIterRows`,
a :class:`raymodule.data.DatasetIter` whose dataset is the iterator's arrays as they are when
``fit`` starts (put in the object store once) and whose order is the iterator's own: its
``reset()`` calls the iterator's, which shuffles with numpy's global RNG as it would under
MXNet's ``fit``, and follows the permutation it applied. So the drop-in path sends the
workers indices, not samples, trains the same batches in the same order, moves the user's
random stream the same, and leaves the iterator as MXNet's ``fit`` leaves it.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet.io import DataBatch

from .datasets import LAST_BATCH_HANDLES, ArrayDataset, DatasetIter

__all__ = ["NDArrayIterRows", "rows_of"]


def rows_of(data_iter):
    """``data_iter`` as an :class:`NDArrayIterRows` when it is an ``mx.io.NDArrayIter``
    whose rows can be read by index (dense NDArrays of as many rows, batch axis first, no
    rows kept by ``roll_over`` for its next pass), else None. A subclass is not: it
    may give other batches."""
    if type(data_iter) is not mx.io.NDArrayIter:
        return None
    arrays = [a for _, a in data_iter.data + data_iter.label]
    dense = all(type(a) is mx.nd.NDArray for a in arrays)
    # NDArrayIter counts the first array's rows and takes longer arrays as they are
    if not dense or any(a.shape[0] != data_iter.num_data for a in arrays):
        return None
    if data_iter.layout.find("N") != 0 or data_iter.last_batch_handle not in LAST_BATCH_HANDLES:
        return None
    kept = data_iter._cache_data is not None or data_iter._cache_label is not None
    if data_iter.last_batch_handle == "roll_over" and kept:
        return None  # a pass of it opens with the rows it kept, which are no indices
    return NDArrayIterRows(data_iter)


class _Copied(ArrayDataset):
    """An :class:`ArrayDataset` of copies of an NDArrayIter's arrays: once they are in the
    object store, the copies are dropped and the store's read in place when needed."""

    def ref(self):
        if self._ref is None:
            super().ref()
            self._data = self._label = None
        return self._ref


class NDArrayIterRows(DatasetIter):
    """The batches of ``source`` (an ``mx.io.NDArrayIter``, see :func:`rows_of`) as
    indices into its arrays as they are now. Position ``j`` of the source's data is row
    ``order[j]`` of the dataset: each shuffle of the source (``data = data[idx]``) becomes
    ``order = order[idx]``."""

    def __init__(self, source: mx.io.NDArrayIter):
        dataset = _Copied(dict(source.data), dict(source.label) or None)
        super().__init__(dataset, source.batch_size, last_batch_handle=source.last_batch_handle)
        self.source = source
        self.shuffle = source.shuffle
        self.cursor = source.cursor
        self._followed = source.data[0][1]  # the source's first array as these last saw it

    @property
    def provide_data(self):
        return self.source.provide_data

    @property
    def provide_label(self):
        return self.source.provide_label

    def _follow(self, reset) -> None:
        """Runs the source's ``reset`` or ``hard_reset`` from this iterator's position and
        takes its order and position."""
        if self.source.data[0][1] is not self._followed:
            raise RuntimeError(
                "the NDArrayIter given to fit was shuffled outside fit (reset by a callback?): "
                "its order is no longer known"
            )
        self.source.cursor = self.cursor
        reset()
        if self.shuffle:
            self._order = self._order[self.source.idx]
        self._followed = self.source.data[0][1]
        self.cursor = self.source.cursor
        self.epoch += 1

    def reset(self) -> None:
        self._follow(self.source.reset)

    def hard_reset(self) -> None:
        self._follow(self.source.hard_reset)
        self._cache = None

    def begin_pass(self, k: int) -> None:
        raise NotImplementedError(
            "an NDArrayIter's pass cannot be chosen: its order comes from numpy's global RNG"
        )

    def next_indices(self) -> tuple[np.ndarray, int]:
        try:
            index, pad = super().next_indices()
        except StopIteration:
            if self._cache is not None:  # roll_over: the source keeps the rest, as its next()
                self.source.cursor = self.cursor
                self.source._cache_data = self.source.getdata()
                self.source._cache_label = self.source.getlabel()
            raise
        if self.last_batch_handle == "roll_over" and -self.batch_size < self.cursor < 0:
            self.source._cache_data = self.source._cache_label = None  # used, as its next()
        return index, pad

    def batch_of(self, index: np.ndarray, pad: int) -> DataBatch:
        """The batch at ``index`` for the callbacks: its arrays are read from the dataset
        only if a callback reads them."""
        return _RowsBatch(self, index, pad)


class _RowsBatch(DataBatch):
    """A ``DataBatch`` of an :class:`NDArrayIterRows` whose ``data`` and ``label`` are read
    from the dataset when first asked for (the workers read the rows; most callbacks never
    look). raymodule itself never asks: it takes the shapes from ``provide_data``."""

    reads_on_demand = True

    def __init__(self, rows: NDArrayIterRows, index: np.ndarray, pad: int):
        self._rows, self._data, self._label = rows, None, None
        super().__init__(
            data=None,
            label=None,
            pad=pad,
            index=index,
            provide_data=rows.provide_data,
            provide_label=rows.provide_label,
        )

    def _read(self) -> None:
        dataset = self._rows.dataset
        data, label = dataset.take(self.index)
        self._data = DatasetIter._arrays(data, dataset.data_descs)
        self._label = DatasetIter._arrays(label, dataset.label_descs)

    @property
    def data(self):
        if self._data is None:
            self._read()
        return self._data

    @data.setter
    def data(self, value):
        self._data = value

    @property
    def label(self):
        if self._label is None:
            self._read()
        return self._label

    @label.setter
    def label(self, value):
        self._label = value
