"""Data for raymodule: datasets the workers read themselves, their iterator, and how a global
batch becomes per-worker slices.

- :mod:`.datasets`: :class:`ArrayDataset` (arrays put in Ray's object store once) and
  :class:`DatasetIter`, an ``mx.io.DataIter`` whose sample order is a function of its seed and
  pass number only.
- :mod:`.batches`: :class:`Batch`, the work split of a global batch and the merge of
  per-worker outputs.
"""

from __future__ import annotations

from .batches import (
    Batch,
    batch_axes,
    merge_outputs,
    nd_bytes,
    split_params,
    split_shapes,
    split_slices,
    to_batch,
    to_ndarray,
    to_numpy,
)
from .datasets import ArrayDataset, DatasetIter, IndexedParts, index_batch, pass_order

__all__ = [
    "ArrayDataset",
    "DatasetIter",
    "pass_order",
    "IndexedParts",
    "index_batch",
    "Batch",
    "split_slices",
    "split_shapes",
    "batch_axes",
    "to_batch",
    "to_numpy",
    "to_ndarray",
    "nd_bytes",
    "split_params",
    "merge_outputs",
]
