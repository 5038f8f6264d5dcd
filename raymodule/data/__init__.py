"""Data for raymodule: datasets the workers read themselves, their iterator, and how a global
batch becomes per-worker slices.

- :mod:`.datasets`: :class:`ArrayDataset` (arrays put in Ray's object store once) and
  :class:`DatasetIter`, an ``mx.io.DataIter`` whose sample order is a function of its seed and
  pass number only.
- :mod:`.recordio`: :class:`RecordIODataset`, MXNet indexed RecordIO (``.rec`` + ``.idx``) read
  by byte ranges from a local path or a URI.
- :mod:`.raydata`: :class:`RayDataIter`, a ``ray.data.Dataset`` each worker streams its own
  share of (epoch-granular where the others are step-exact).
- :mod:`.batches`: :class:`Batch`, the work split of a global batch and the merge of
  per-worker outputs.
"""

from __future__ import annotations

from . import batches, datasets, raydata, recordio
from .batches import *  # noqa: F403 - the package's API is its modules' (their __all__)
from .datasets import *  # noqa: F403
from .raydata import *  # noqa: F403
from .recordio import *  # noqa: F403

__all__ = [*datasets.__all__, *recordio.__all__, *raydata.__all__, *batches.__all__]
