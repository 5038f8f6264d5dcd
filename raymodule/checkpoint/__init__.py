"""Run checkpoints: what a replica's state is (:mod:`.snapshot`), how it is laid out and
verified in storage (:mod:`.format`, :mod:`.manifest`), how the optimizer's state is captured
and restored (:mod:`.optimizer_state`), what a resume must match (:mod:`.continuity`) and the
background writer that commits them while training goes on (:mod:`.writer`).

The names below are the package's API; :mod:`.optimizer_state` (MXNet) is imported by name
where it is used.
"""

from . import format as _format
from .format import *  # noqa: F403 - the package's API: the format's names and these
from .manifest import FORMAT, MANIFEST
from .snapshot import Snapshot
from .writer import CheckpointWriter

__all__ = [*_format.__all__, "FORMAT", "MANIFEST", "Snapshot", "CheckpointWriter"]
