"""Run checkpoints: what a replica's state is (:mod:`.snapshot`), how it is laid out and
verified in storage (:mod:`.format`, :mod:`.manifest`), how the optimizer's state is captured
and restored (:mod:`.optimizer_state`), what a resume must match (:mod:`.continuity`) and the
background writer that commits them while training goes on (:mod:`.writer`).

The names below are the package's API; :mod:`.optimizer_state` (MXNet) is imported by name
where it is used.
"""

from .format import (
    LATEST,
    LATEST_MAX_BYTES,
    MODEL,
    Checkpoint,
    checkpoint_names,
    folder_name,
    is_folder_name,
    latest,
    latest_checkpoint,
    params_file_name,
    read,
    stage_files,
    survey,
    write,
)
from .manifest import FORMAT, MANIFEST
from .snapshot import Snapshot
from .writer import CheckpointWriter

__all__ = [
    "FORMAT",
    "LATEST",
    "LATEST_MAX_BYTES",
    "MANIFEST",
    "MODEL",
    "Checkpoint",
    "CheckpointWriter",
    "Snapshot",
    "checkpoint_names",
    "folder_name",
    "is_folder_name",
    "latest",
    "latest_checkpoint",
    "params_file_name",
    "read",
    "stage_files",
    "survey",
    "write",
]
