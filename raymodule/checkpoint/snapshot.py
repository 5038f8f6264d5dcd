"""A replica's state at a step boundary: what a worker takes, the checkpoint writer writes, a
new or lagging worker restores, and a Tune trial hands over."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

__all__ = ["Snapshot"]


@dataclass(frozen=True, eq=False)  # numpy fields: compared as objects
class Snapshot:
    """Every replica holds the same state, so one replica's snapshot is the run's. A worker's
    holds its arrays' bytes in numpy arrays (:func:`raymodule.data.nd_buffer`: Ray moves them
    without copying), one read from a checkpoint in ``bytes``; ``bytes(...)`` gives either."""

    params: bytes | np.ndarray  # MXNet's .params format: "arg:NAME" and "aux:NAME" arrays
    optimizer_arrays: bytes | np.ndarray  # the optimizer's state arrays (optimizer.nd)
    optimizer: dict | None  # how they nest, update counts, schedule; None before an optimizer
    applied: int | None = None  # steps applied when taken; None when read from a checkpoint

    def files(self, params_name: str) -> dict[str, bytes | np.ndarray]:
        """The checkpoint files it is written as, the parameters named ``params_name``."""
        return {
            params_name: self.params,
            "optimizer.nd": self.optimizer_arrays,
            "optimizer.json": json.dumps(self.optimizer).encode(),
        }
