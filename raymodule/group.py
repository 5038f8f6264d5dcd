"""The worker group: placing one worker actor per context, and their collective group.

Workers are placed with a Ray placement group (one bundle per worker), so that on an
autoscaling cluster pending workers ask for nodes; inside a Tune trial the trial's own
placement group is used and none is created.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .constants import Settings
from .errors import PlacementError
from .worker import ModuleWorker  # light: MXNet is imported in the worker process only

__all__ = ["WorkerGroup"]

log = logging.getLogger(__name__)


def _describe(bundles: list[dict]) -> str:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0) + value
    return f"{len(bundles)} workers needing {total} in all (per worker: {bundles})"


def _relevant(resources: dict, bundles: list[dict]) -> dict:
    """The entries of ``resources`` that the bundles ask for (not placement-group bookkeeping)."""
    keys = {k for b in bundles for k in b} | {"CPU"}
    return {k: resources.get(k, 0) for k in sorted(keys)}


def _cluster_has_room(bundles: list[dict]) -> bool:
    capacity = ray.cluster_resources()
    for key in {k for b in bundles for k in b}:
        if sum(b.get(key, 0) for b in bundles) > capacity.get(key, 0):
            return False
    return True


class WorkerGroup:
    """Starts, tracks and stops the workers of one module family."""

    def __init__(self, bundles: list[dict], devices: list, fail_fast: bool, settings: Settings):
        self.bundles = bundles
        self.devices = devices
        self.fail_fast = fail_fast
        self.settings = settings
        self.workers: list = []
        self._own_pg: PlacementGroup | None = None

    def start(self, backend: str) -> list:
        """Places every worker (bounded wait), then forms their collective group."""
        pg, indexed = self._placement()
        actor_class = ray.remote(ModuleWorker)
        for rank, (bundle, device) in enumerate(zip(self.bundles, self.devices)):
            strategy = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=rank if indexed else -1
            )
            self.workers.append(
                actor_class.options(
                    num_cpus=bundle.get("CPU", 0),
                    num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=strategy,
                ).remote(device, self.settings.allreduce_bucket_bytes)
            )
        self._form_collective(backend)
        return self.workers

    def _placement(self) -> tuple[PlacementGroup, bool]:
        current = get_current_placement_group()
        if current is not None:
            return current, False
        if self.fail_fast and not _cluster_has_room(self.bundles):
            raise PlacementError(
                f"cannot place {_describe(self.bundles)}: this local Ray has "
                f"{_relevant(ray.cluster_resources(), self.bundles)} (start Ray with more "
                "CPUs/GPUs, or pass fewer contexts)"
            )
        pg = placement_group(self.bundles, strategy="PACK")
        self._own_pg = pg
        limit = 10.0 if self.fail_fast else self.settings.placement_timeout_s
        report = self.settings.placement_report_interval_s
        start = time.monotonic()
        while True:
            waited = time.monotonic() - start
            ready, _ = ray.wait([pg.ready()], timeout=max(0.0, min(report, limit - waited)))
            if ready:
                return pg, True
            waited = time.monotonic() - start
            if waited >= limit:
                self.stop()
                raise PlacementError(
                    f"cannot place {_describe(self.bundles)} within {limit:g} s; the cluster "
                    f"has {_relevant(ray.cluster_resources(), self.bundles)} in all and "
                    f"{_relevant(ray.available_resources(), self.bundles)} free "
                    "(RAYMODULE_PLACEMENT_TIMEOUT_S sets the wait)"
                )
            log.warning(
                "raymodule: still waiting %.0f s for %s; free now: %s",
                waited,
                _describe(self.bundles),
                ray.available_resources(),
            )

    def _form_collective(self, backend: str) -> None:
        world = len(self.workers)
        if world == 1:
            return
        address = ray.get(self.workers[0].rendezvous_address.remote())
        timeout_s = self.settings.collective_timeout_s
        ray.get(
            [
                w.join.remote(world, rank, address, backend, timeout_s)
                for rank, w in enumerate(self.workers)
            ]
        )

    def stop(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)
            self._own_pg = None
