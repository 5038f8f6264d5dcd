"""The worker group: placing one worker actor per context, and their collective group.

Workers are placed with a Ray placement group (one bundle per worker, packed), so that on an
autoscaling cluster pending workers ask for nodes; inside a Tune trial the trial's own
placement group is used and none is created. A group that may start with fewer workers than it
has contexts (an elastic run's floor) and finds no room for all of them within
RAYMODULE_START_WAIT_S places each worker in a placement group of its own instead: it starts
once the floor is up, and the others, still asking the cluster (and its autoscaler) for their
resources, join the run as they come up.
"""

from __future__ import annotations

import logging
import secrets
import time

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..constants import Settings
from ..errors import PlacementError, WorkerError, WorkerLostError, first_line
from ..worker.cores import places
from ..worker.shm import SameNode
from .membership import Membership
from .waits import call_outcome

__all__ = ["FormFailed", "WorkerGroup"]

log = logging.getLogger(__name__)

_POLL_S = 1.0  # how often a start below every worker looks for placed workers again


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


def _draining_nodes() -> set[str]:
    """The ids of the nodes Ray is draining (its drain API: an autoscaler's preemption or idle
    drain, ``ray drain-node``, a node sent SIGTERM). Ray has no public call for it yet: read
    through its state accessor, and an empty set if that is missing or does not answer (the
    GCS restarting: an RpcError): a hint, which no step waits for."""
    try:
        return set(ray._private.state.state.get_draining_nodes())
    except (AttributeError, ray.exceptions.RayError) as err:
        log.debug("raymodule: cannot read the draining nodes: %s", err)
        return set()


class FormFailed(WorkerError):
    """Workers raised errors of their own while the group re-formed, nobody lost: ``errors``
    says each one's, by slot (the message names the first)."""

    def __init__(self, errors: dict[int, str]):
        first = min(errors)
        super().__init__(
            f"the worker of slot {first} failed while the group re-formed: {errors[first]}"
        )
        self.errors = errors


def _unresponsive(slots: list[int], refs: list, timeout_s: float) -> dict[int, str]:
    """The slots whose call failed because their worker is gone, or that did not answer
    within ``timeout_s`` (alive but silent), each with why. Other errors raise
    :class:`FormFailed`, unless a worker is gone or silent (its peers' calls then fail for
    that reason)."""
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(done)
    lost, failed = {}, {}
    for slot, ref in zip(slots, refs):
        if ref not in done:
            lost[slot] = f"silent: no answer within {timeout_s:g} s while the group re-formed"
            continue
        kind, err = call_outcome(ref)
        if kind == "dead":
            lost[slot] = f"{type(err).__name__}: {first_line(err)}"
        elif kind != "ok":  # an error of its own, its group's, or an answer Ray cannot give
            cause = getattr(err, "cause", None) or err
            failed[slot] = f"{type(cause).__name__}: {first_line(cause)}"
    if failed and not lost:
        raise FormFailed(failed)
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


def _check_not_removed(pg: PlacementGroup, what: str) -> None:
    """Raises :class:`PlacementError` if ``pg`` was removed: nothing can start in it."""
    if placement_group_table(pg).get("state") == "REMOVED":
        raise PlacementError(
            f"the placement group {what} would start in ({pg.id.hex()}) was removed (Ray Tune "
            "stopping the trial it belongs to, or whoever made it removing it): no worker can "
            "start in it"
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
        self,
        bundles: list[dict],
        devices: list,
        fail_fast: bool,
        settings: Settings,
        worker_class,
        family: str = "",
    ):
        self.bundles = bundles
        self.family = family  # the placement groups' names start with it (none: unnamed)
        self._grouped = len(bundles) > 1  # one slot: never a collective group
        self.devices = devices
        self.fail_fast = fail_fast
        self.settings = settings
        self.members: dict[int, ray.actor.ActorHandle] = {}  # slot -> worker, in the group
        self.pending: dict[int, ray.actor.ActorHandle] = {}  # slot -> replacement, starting
        self.nodes: dict[int, dict] = {}  # slot -> the member's describe(): node, pid, cores
        self.generation = 0
        self._probes: dict[int, ray.ObjectRef] = {}
        self._placed_in: dict[int, tuple[PlacementGroup, int]] = {}  # slot -> (group, bundle)
        self._own_pgs: list[PlacementGroup] = []  # the placement groups made here: removed
        self._actor_class = ray.remote(worker_class)
        self._next_drain_poll = 0.0

    def start(self, backend: str, start_with: int | None = None) -> Membership:
        """Places the workers (bounded wait), then forms their collective group: every worker,
        or, with ``start_with`` below the number of contexts (and outside a Tune trial), as
        soon as ``start_with`` of them are up; the others stay pending (see :meth:`ready`)."""
        slots = range(len(self.bundles))
        may_start_smaller = start_with is not None and start_with < len(self.bundles)
        if self._place_together(required=not may_start_smaller):
            for slot in slots:
                self.members[slot] = self._spawn(slot)
            probes = [w.describe.remote(self._grouped) for w in self.members.values()]
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
        else:
            self._place_each()
            for slot in slots:
                self._replace(slot)
            self.admit(self._wait_for(start_with))
        membership, lost = self.form(backend)
        if lost:
            self.stop()
            raise WorkerLostError(
                f"the workers of slots {sorted(lost)} were lost before training "
                f"started: {'; '.join(lost.values())}"
            )
        return membership

    def _wait_for(self, count: int) -> list[int]:
        """The slots whose worker is up, once ``count`` are and so is every worker whose
        resources are there (its placement group placed: it is only starting). Bounded by
        RAYMODULE_PLACEMENT_TIMEOUT_S; a wait past it stops every worker and raises."""
        limit = self.settings.placement_timeout_s
        start = time.monotonic()
        next_report = start + self.settings.placement_report_interval_s
        while True:
            ready = self.ready(0.0)
            waited = time.monotonic() - start
            starting = [slot for slot in self._probes if slot not in ready]
            placed = placement_group_table()
            booting = [
                slot
                for slot in starting
                if placed.get(self._placed_in[slot][0].id.hex(), {}).get("state") == "CREATED"
            ]
            if len(ready) >= count and not booting:
                return ready
            if waited >= limit:
                self.stop()
                raise PlacementError(
                    f"only {len(ready)} of {_describe(self.bundles)} started within {limit:g} s, "
                    f"and training needs {count} to start; the cluster has "
                    f"{_relevant(ray.cluster_resources(), self.bundles)} in all "
                    "(RAYMODULE_PLACEMENT_TIMEOUT_S sets the wait)"
                )
            if time.monotonic() >= next_report:
                next_report += self.settings.placement_report_interval_s
                log.warning(
                    "raymodule: %d of %d workers up, training starts with %d: waiting (%.0f s "
                    "of %.0f s); free now: %s",
                    len(ready), len(self.bundles), count, waited, limit,
                    _relevant(ray.available_resources(), self.bundles),
                )  # fmt: skip
            probes = [self._probes[slot] for slot in starting]
            ray.wait(probes, num_returns=1, timeout=min(_POLL_S, limit - waited))

    def _spawn(self, slot: int):
        bundle = self.bundles[slot]
        pg, index = self._placed_in[slot]
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
        return self._actor_class.options(
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=strategy,
        ).remote(
            self.devices[slot],
            self.settings.allreduce_bucket_bytes,
            bool(self.settings.shm_allreduce),
            bool(self.settings.pin_cores),
            bool(self.settings.split_update),
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
        )

    def remove(self, slots: list[int]) -> None:
        """Kills the members of ``slots`` (dead or silent) and starts their replacements."""
        for slot in slots:
            worker = self.members.pop(slot, None)
            if worker is not None:
                ray.kill(worker, no_restart=True)
            self.nodes.pop(slot, None)
            self._replace(slot)

    def draining(self, slots: tuple[int, ...]) -> list[int]:
        """Those of the members' ``slots`` whose worker is on a node Ray is draining
        (:func:`_draining_nodes`), asked of Ray at most every RAYMODULE_ADMIT_INTERVAL_S
        (none in between)."""
        if time.monotonic() < self._next_drain_poll:
            return []
        self._next_drain_poll = time.monotonic() + self.settings.admit_interval_s
        draining = _draining_nodes()
        return [slot for slot in slots if self.nodes.get(slot, {}).get("node") in draining]

    def _replace(self, slot: int) -> None:
        """Starts a worker for ``slot``; raises :class:`PlacementError` if the placement group it
        goes in was removed (Ray Tune stopping the trial: Ray sends the group's actors SIGTERM,
        a member then leaves, and a worker started there would only die)."""
        _check_not_removed(self._placed_in[slot][0], f"slot {slot}'s worker")
        self.pending[slot] = self._spawn(slot)
        self._probes[slot] = self.pending[slot].describe.remote(self._grouped)

    def ready(self, timeout_s: float = 0.0) -> list[int]:
        """Slots whose replacement is up: waits up to ``timeout_s`` for them all, and with
        none up (or none pending) returns after ``timeout_s``, so that a caller polling it
        does not spin. A replacement that died while starting (its node lost too) is started
        again."""
        deadline = time.monotonic() + timeout_s
        slot_of = {ref: slot for slot, ref in self._probes.items()}
        done = (
            ray.wait(list(slot_of), num_returns=len(slot_of), timeout=timeout_s)[0]
            if slot_of
            else []
        )
        ready = []
        for ref in done:
            slot = slot_of[ref]
            try:
                self.nodes[slot] = ray.get(ref)
            except ray.exceptions.RayError as err:
                log.info("raymodule: the worker for slot %d failed to start (%s); again", slot, err)
                self._replace(slot)
                continue
            ready.append(slot)
        if not ready:
            time.sleep(max(0.0, deadline - time.monotonic()))
        return sorted(ready)

    def admit(self, slots: list[int]) -> None:
        """Makes the ready replacements of ``slots`` members (before the next :meth:`form`)."""
        for slot in slots:
            if slot in self.pending:  # not when asked again after a failed forming
                self.members[slot] = self.pending.pop(slot)
                self._probes.pop(slot)

    def _place_each(self) -> None:
        """A placement group per worker, not waited for: each asks for its worker's resources
        until they are there."""
        for slot, bundle in enumerate(self.bundles):
            pg = placement_group([bundle], name=self._name(f"slot{slot}"))
            self._own_pgs.append(pg)
            self._placed_in[slot] = (pg, 0)

    def _name(self, what: str) -> str:
        return f"{self.family}-{what}" if self.family else ""

    def _place_together(self, required: bool) -> bool:
        """One placement group for every worker, packed, or the Tune trial's. Waits for it up
        to RAYMODULE_PLACEMENT_TIMEOUT_S and raises past it; not ``required``, gives up after
        RAYMODULE_START_WAIT_S instead and returns False."""
        current = get_current_placement_group()
        if current is not None:
            _check_not_removed(current, "the workers")
            _check_fits(self.bundles, current.bundle_specs)
            self._placed_in = dict.fromkeys(range(len(self.bundles)), (current, -1))
            return True
        fits = _fits(self.bundles, ray.cluster_resources())
        if self.fail_fast and not fits and not required:
            return False  # a Ray raymodule started gets no more nodes
        if self.fail_fast and not fits:
            raise PlacementError(
                f"cannot place {_describe(self.bundles)}: this local Ray has "
                f"{_relevant(ray.cluster_resources(), self.bundles)} (start Ray with more "
                "CPUs/GPUs, or pass fewer contexts)"
            )
        pg = placement_group(self.bundles, strategy="PACK", name=self._name("all"))
        self._own_pgs.append(pg)
        self._placed_in = {slot: (pg, slot) for slot in range(len(self.bundles))}
        limit = 10.0 if self.fail_fast else self.settings.placement_timeout_s
        if not required:
            limit = min(limit, self.settings.start_wait_s)
        report = self.settings.placement_report_interval_s
        start = time.monotonic()
        while True:
            waited = time.monotonic() - start
            ready, _ = ray.wait([pg.ready()], timeout=max(0.0, min(report, limit - waited)))
            if ready:
                return True
            waited = time.monotonic() - start
            if waited >= limit and not required:
                log.info(
                    "raymodule: no room for %s within %.0f s: starting with the workers "
                    "placed one by one",
                    _describe(self.bundles),
                    waited,
                )
                self._own_pgs.remove(pg)
                remove_placement_group(pg)
                return False
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
        meanwhile, with why (no group was formed then: remove them and form again). Members
        all on one node summing through shared memory meet there (:class:`SameNode`); others
        at a store rank 0 serves. CPU workers learn their place among the members that share
        their cores (:func:`places`: one machine's, whichever Ray node), which pins them.

        Each phase is bounded: leaving by the collective timeout (a member still in a
        collective fails within it), the rendezvous by twice that (the store or the shared
        memory, then the group's connections, each bounded by it)."""
        self.generation += 1
        slots = sorted(self.members)
        workers = [self.members[s] for s in slots]
        timeout_s = self.settings.collective_timeout_s
        leaving = [w.leave.remote(self.generation) for w in workers]
        lost = _unresponsive(slots, leaving, timeout_s)
        if not lost and len(workers) > 1:
            rendezvous = self._same_node(slots, backend)
            if rendezvous is None:
                rendezvous = workers[0].rendezvous_address.remote()
                lost = _unresponsive(slots[:1], [rendezvous], timeout_s)
            if not lost:
                generation = self.generation
                names = [self.nodes.get(s, {}).get("cores_name") for s in slots]
                place = places(names if backend == "gloo" else [None] * len(slots))
                refs = [
                    w.join.remote(
                        len(workers), rank, rendezvous, backend, timeout_s, generation, place[rank]
                    )
                    for rank, w in enumerate(workers)
                ]
                lost = _unresponsive(slots, refs, 2 * timeout_s)
        return self.membership(), lost

    def _same_node(self, slots: list[int], backend: str) -> SameNode | None:
        """The shared-memory rendezvous of members ``slots`` when they all run on one node
        and each sums through shared memory (gloo, and :meth:`.ModuleWorker.describe` says it
        may); else None."""
        where = [self.nodes.get(slot, {}) for slot in slots]
        nodes = {place.get("node") for place in where}
        shared = all(place.get("shared_memory") for place in where)
        if backend != "gloo" or not shared or len(nodes) != 1 or None in nodes:
            return None
        return SameNode(tuple(place["pid"] for place in where), secrets.token_hex(4))

    def stop(self) -> None:
        for worker in [*self.members.values(), *self.pending.values()]:
            ray.kill(worker, no_restart=True)
        self.members, self.pending, self._probes = {}, {}, {}
        for pg in self._own_pgs:
            remove_placement_group(pg)
        self._own_pgs = []
