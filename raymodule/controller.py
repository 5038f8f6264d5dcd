"""The controller actor: one per module family, owner of its worker group.

It reserves no resources. It places the workers, forms their collective group, hands their
handles to the client, and stops them. Module calls go from the client straight to the
workers (one hop fewer per step); membership changes go through here.
"""

from __future__ import annotations

import ray

from .constants import Settings
from .group import WorkerGroup

__all__ = ["Controller"]


class Controller:
    def __init__(
        self, bundles: list[dict], devices: list, fail_fast: bool, backend: str, settings: Settings
    ):
        self._group = WorkerGroup(bundles, devices, fail_fast, settings)
        self._backend = backend

    def start(self) -> list:
        """Places the workers and forms their group; returns their handles, in rank order."""
        return self._group.start(self._backend)

    def shutdown(self) -> None:
        self._group.stop()


RemoteController = ray.remote(num_cpus=0, max_restarts=0)(Controller)
