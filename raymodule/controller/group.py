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

from ..constants import Settings
from ..errors import PlacementError, WorkerError, WorkerLostError, first_line
from .membership import Membership

__all__ = ["WorkerGroup"]

log = logging.getLogger(__name__)


def _total(bundles: list[dict]) -> dict[str, float]:
    """The resources of all ``bundles`` together, per resource."""
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0) + value
    return total


def _fits(bundles: list[dict], capacity: dict) -> bool:
    """Whether ``capacity`` holds every resource the bundles ask for, in all."""
    return all(value <= capacity.get(key, 0) for key, value in _total(bundles).items())


def _describe(bundles: list[dict]) -> str:
    return f"{len(bundles)} workers needing {_total(bundles)} in all (per worker: {bundles})"


def _relevant(resources: dict, bundles: list[dict]) -> dict:
    """The entries of ``resources`` that the bundles ask for (not placement-group bookkeeping)."""
    keys = {k for b in bundles for k in b} | {"CPU"}
    return {k: resources.get(k, 0) for k in sorted(keys)}


def _unresponsive(slots: list[int], refs: list, timeout_s: float) -> dict[int, str]:
    """The slots whose call failed because their worker is gone, or that did not answer
    within ``timeout_s`` (alive but silent), each with why. Another error is raised as a
    WorkerError naming the slot, unless a worker is gone or silent (its peers' calls then fail
    for that reason)."""
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(done)
    lost, failed = {}, None
    for slot, ref in zip(slots, refs):
        if ref not in done:
            lost[slot] = f"silent: no answer within {timeout_s:g} s while the group re-formed"
            continue
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as err:
            lost[slot] = f"{type(err).__name__}: {first_line(err)}"
        except ray.exceptions.RayTaskError as err:
            failed = failed or (slot, err)
    if failed is not None and not lost:
        slot, err = failed
        cause = getattr(err, "cause", None) or err
        raise WorkerError(
            f"the worker of slot {slot} failed while the group re-formed: "
            f"{type(cause).__name__}: {first_line(cause)}"
        )
    return lost


def _check_fits(bundles: list[dict], reserved: list[dict]) -> None:
    """Workers placed in a placement group that is not theirs (a Tune trial's) must fit in
    what it reserved, or they would wait for ever."""
    if not _fits(bundles, _total(reserved)):
        raise PlacementError(
            f"{_describe(bundles)}, but the placement group they run in (a Tune trial's) "
            f"reserved {reserved}: build the module on the contexts the trial reserved "
            "(raymodule.tune.workers()), or reserve more with raymodule.tune.with_workers"
        )


class WorkerGroup:
    """Starts, tracks and stops the workers of one module family.

    Each context is a *slot*; a member is the worker now holding a slot. A lost member's slot
    gets a replacement worker at once, in the same placement-group bundle: it starts when that
    bundle has resources again (at once after a killed process, when a node is back after a
    lost node, which on an autoscaling cluster is what asks for one) and joins at the next
    re-forming of the collective group. Every re-forming starts a new generation.
    """

    def __init__(
        self, bundles: list[dict], devices: list, fail_fast: bool, settings: Settings, worker_class
    ):
        self.bundles = bundles
        self.devices = devices
        self.fail_fast = fail_fast
        self.settings = settings
        self.members: dict[int, ray.actor.ActorHandle] = {}  # slot -> worker, in the group
        self.pending: dict[int, ray.actor.ActorHandle] = {}  # slot -> replacement, starting
        self.nodes: dict[int, dict] = {}  # slot -> the member's node id and pid
        self.generation = 0
        self._probes: dict[int, ray.ObjectRef] = {}
        self._pg: PlacementGroup | None = None
        self._indexed = False
        self._own_pg: PlacementGroup | None = None
        self._actor_class = ray.remote(worker_class)

    def start(self, backend: str) -> Membership:
        """Places every worker (bounded wait), then forms their collective group."""
        self._pg, self._indexed = self._placement()
        for slot in range(len(self.bundles)):
            self.members[slot] = self._spawn(slot)
        probes = [w.describe.remote() for w in self.members.values()]
        limit = self.settings.placement_timeout_s
        _, late = ray.wait(probes, num_returns=len(probes), timeout=limit)
        if late:
            self.stop()
            raise PlacementError(
                f"{len(late)} of {_describe(self.bundles)} did not start within {limit:g} s "
                "(RAYMODULE_PLACEMENT_TIMEOUT_S sets the wait)"
            )
        described = ray.get(probes)
        self.nodes = dict(zip(self.members, described))
        membership, lost = self.form(backend)
        if lost:
            self.stop()
            raise WorkerLostError(
                f"the workers of slots {sorted(lost)} were lost before training "
                f"started: {'; '.join(lost.values())}"
            )
        return membership

    def _spawn(self, slot: int):
        bundle = self.bundles[slot]
        strategy = PlacementGroupSchedulingStrategy(
            self._pg, placement_group_bundle_index=slot if self._indexed else -1
        )
        return self._actor_class.options(
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=strategy,
        ).remote(
            self.devices[slot],
            self.settings.allreduce_bucket_bytes,
            bool(self.settings.shm_allreduce),
        )

    def membership(self) -> Membership:
        """The members now, in rank order (by slot)."""
        slots = tuple(sorted(self.members))
        return Membership(
            handles=tuple(self.members[s] for s in slots),
            slots=slots,
            nodes=tuple(self.nodes.get(s, {}) for s in slots),
            generation=self.generation,
            pending=tuple(sorted(self.pending)),
            placement_group=self._own_pg,
        )

    def remove(self, slots: list[int]) -> None:
        """Kills the members of ``slots`` (dead or silent) and starts their replacements."""
        for slot in slots:
            worker = self.members.pop(slot, None)
            if worker is not None:
                ray.kill(worker, no_restart=True)
            self.nodes.pop(slot, None)
            self._replace(slot)

    def _replace(self, slot: int) -> None:
        self.pending[slot] = self._spawn(slot)
        self._probes[slot] = self.pending[slot].describe.remote()

    def ready(self, timeout_s: float = 0.0) -> list[int]:
        """Slots whose replacement is up (waits up to ``timeout_s`` for the first one).
        A replacement that died while starting (its node lost too) is started again."""
        if not self._probes:
            return []
        slot_of = {ref: slot for slot, ref in self._probes.items()}
        done, _ = ray.wait(list(slot_of), num_returns=len(slot_of), timeout=timeout_s)
        if not done and timeout_s > 0:
            done, _ = ray.wait(list(slot_of), num_returns=1, timeout=0)
        ready = []
        for ref in done:
            slot = slot_of[ref]
            try:
                self.nodes[slot] = ray.get(ref)
            except ray.exceptions.RayError as err:
                log.info(
                    "raymodule: replacement for slot %d failed to start (%s); again", slot, err
                )
                self._replace(slot)
                continue
            ready.append(slot)
        return sorted(ready)

    def admit(self, slots: list[int]) -> None:
        """Makes the ready replacements of ``slots`` members (before the next :meth:`form`)."""
        for slot in slots:
            if slot in self.pending:  # not when asked again after a failed forming
                self.members[slot] = self.pending.pop(slot)
                self._probes.pop(slot)

    def _placement(self) -> tuple[PlacementGroup, bool]:
        current = get_current_placement_group()
        if current is not None:
            _check_fits(self.bundles, current.bundle_specs)
            return current, False
        if self.fail_fast and not _fits(self.bundles, ray.cluster_resources()):
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

    def form(self, backend: str) -> tuple[Membership, dict[int, str]]:
        """A new collective group among the members (a fresh rendezvous, the next generation);
        returns the :meth:`membership` and the slots whose member died or stayed silent
        meanwhile, with why (no group was formed then: remove them and form again).

        Each phase is bounded: leaving by the collective timeout (a member still in a
        collective fails within it), the rendezvous by twice that (torch's store, then the
        group's connections, each bounded by it)."""
        self.generation += 1
        slots = sorted(self.members)
        workers = [self.members[s] for s in slots]
        timeout_s = self.settings.collective_timeout_s
        leaving = [w.leave.remote(self.generation) for w in workers]
        lost = _unresponsive(slots, leaving, timeout_s)
        if not lost and len(workers) > 1:
            address = workers[0].rendezvous_address.remote()
            lost = _unresponsive(slots[:1], [address], timeout_s)
            if not lost:
                refs = [
                    w.join.remote(len(workers), rank, address, backend, timeout_s, self.generation)
                    for rank, w in enumerate(workers)
                ]
                lost = _unresponsive(slots, refs, 2 * timeout_s)
        return self.membership(), lost

    def stop(self) -> None:
        for worker in [*self.members.values(), *self.pending.values()]:
            ray.kill(worker, no_restart=True)
        self.members, self.pending, self._probes = {}, {}, {}
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)
            self._own_pg = None
