"""Data for raymodule: datasets the workers read themselves, their iterator, and how a global
batch becomes per-worker slices.

- :mod:`.datasets`: :class:`ArrayDataset` (arrays put in Ray's object store once) and
  :class:`DatasetIter`, an ``mx.io.DataIter`` whose sample order is a function of its seed and
  pass number only.
- :mod:`.ndarrayiter`: :class:`NDArrayIterRows`, an ``mx.io.NDArrayIter`` given to ``fit`` read
  as a :class:`DatasetIter` in the same order (:func:`rows_of`).
- :mod:`.recordio`: :class:`RecordIODataset`, MXNet indexed RecordIO (``.rec`` + ``.idx``) read
  by byte ranges from a local path or a URI.
- :mod:`.raydata`: :class:`RayDataIter`, a ``ray.data.Dataset`` each worker streams its own
  share of (epoch-granular where the others are step-exact).
- :mod:`.parts`: :class:`Batch` and what a worker is sent of a chunk of steps, and the work
  split of a global batch, without MXNet (the controller makes and relays them).
- :mod:`.batches`: the same split in MXNet's terms (``DataDesc``, NDArrays) and the merge of
  per-worker outputs.

Names are loaded from their modules on first use, so that the controller's process can
import :mod:`.parts` without MXNet.
"""

from __future__ import annotations

import importlib

_AT = {  # each name's module
    "Batch": ".parts",
    "PartPlan": ".parts",
    "IndexedParts": ".parts",
    "StreamParts": ".parts",
    "split_slices": ".parts",
    "checked_batch_size": ".parts",
    "batch_size_of": ".batches",
    "split_shapes": ".batches",
    "batch_axes": ".batches",
    "to_batch": ".batches",
    "to_numpy": ".batches",
    "to_ndarray": ".batches",
    "ndarray_view": ".batches",
    "copy_into": ".batches",
    "nd_bytes": ".batches",
    "nd_buffer": ".batches",
    "split_params": ".batches",
    "merge_outputs": ".batches",
    "Dataset": ".datasets",
    "ArrayDataset": ".datasets",
    "DatasetIter": ".datasets",
    "index_batch": ".datasets",
    "pass_order": ".datasets",
    "LAST_BATCH_HANDLES": ".datasets",
    "NDArrayIterRows": ".ndarrayiter",
    "rows_of": ".ndarrayiter",
    "RayDataIter": ".raydata",
    "StreamReader": ".raydata",
    "RecordIODataset": ".recordio",
}
__all__ = list(_AT)


def __getattr__(name: str):
    if name in _AT:
        return getattr(importlib.import_module(_AT[name], __name__), name)
    raise AttributeError(f"module 'raymodule.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_AT))
