"""The controller actor: one per module family, owner of its worker group's membership.

It reserves no resources. It places the workers, knows which worker holds each context (its
slot), on which node, and the group's generation; it removes lost workers, starts their
replacements and re-forms the collective group. Module calls go from the client straight to
the workers (one hop fewer per step); membership changes go through here, decided by
:mod:`raymodule.policy` in the client, which alone sees a step fail.
"""

from __future__ import annotations

import ray

from .constants import Settings
from .group import WorkerGroup
from .worker import ModuleWorker  # light: MXNet is imported in the worker process only

__all__ = ["Controller"]


class Controller:
    def __init__(
        self,
        bundles: list[dict],
        devices: list,
        fail_fast: bool,
        backend: str,
        settings: Settings,
        worker_class=ModuleWorker,
    ):
        self._group = WorkerGroup(bundles, devices, fail_fast, settings, worker_class)
        self._backend = backend

    def start(self) -> dict:
        """Places the workers and forms their group; returns the membership."""
        return self._group.start(self._backend)

    def remove(self, slots: list[int]) -> None:
        """Kills the workers of ``slots`` and starts replacements for them."""
        self._group.remove(slots)

    def ready(self, timeout_s: float = 0.0) -> list[int]:
        """Slots whose replacement worker is up and can be admitted."""
        return self._group.ready(timeout_s)

    def reform(self, admit: list[int]) -> dict:
        """Admits the ready replacements of ``admit`` and forms the next generation's group."""
        self._group.admit(admit)
        return self._group.form(self._backend)

    def shutdown(self) -> None:
        self._group.stop()


RemoteController = ray.remote(num_cpus=0, max_restarts=0)(Controller)
