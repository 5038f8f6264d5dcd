"""Tunables that are not per run: one place, each an environment variable with a default.

They are read in the client when a module starts its workers (``Settings.from_env()``) and
handed to the controller and workers, whose processes may not share the client's environment.
Tests shrink them through the environment instead of sleeping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

__all__ = ["Settings"]

_ZERO_ALLOWED = {
    "pipeline_depth",
    "checkpoint_backoff_s",
    "checkpoint_failures_tolerated",
    "max_reforms",
    "shm_allreduce",
    "pin_cores",
    "split_update",
}


@dataclass(frozen=True)
class Settings:
    placement_timeout_s: float = 600.0
    """RAYMODULE_PLACEMENT_TIMEOUT_S: how long workers may wait for resources on a connected
    cluster (an autoscaler may add nodes); a Ray that raymodule started fails at once."""
    start_wait_s: float = 10.0
    """RAYMODULE_START_WAIT_S: how long a run that may start with fewer workers than its
    contexts (an elastic floor) waits for room for all of them, packed as a run needing all
    gets them; past it, it places them one by one and starts once its floor is up, and the
    others join as they come up."""
    placement_report_interval_s: float = 30.0
    """RAYMODULE_PLACEMENT_REPORT_INTERVAL_S: how often a pending placement says what it
    waits for."""
    collective_timeout_s: float = 300.0
    """RAYMODULE_COLLECTIVE_TIMEOUT_S: bound on every collective call and rendezvous; a worker
    still silent twice this long after its peers' collective failed is lost (hung)."""
    call_timeout_s: float = 3600.0
    """RAYMODULE_CALL_TIMEOUT_S: bound on one call to the workers when no collective bounds it
    (a single worker); a worker silent for longer is lost."""
    control_timeout_s: float = 900.0
    """RAYMODULE_CONTROL_TIMEOUT_S: bound on one call to the controller beyond what the call
    itself waits for (a re-forming: leaving, rendezvous and joining, each bounded by the
    collective timeout); a controller silent for longer is lost, and the run goes on from
    its latest checkpoint."""
    max_reforms: int = 2
    """RAYMODULE_MAX_REFORMS: times in a row the group may break with no worker lost (a
    member late, not gone) and be re-formed; one more, and its slowest member is treated as
    lost."""
    min_workers_wait_s: float = 600.0
    """RAYMODULE_MIN_WORKERS_WAIT_S: how long an elastic run below its floor (min_workers, or
    every context) waits for replacement workers before it fails."""
    admit_interval_s: float = 1.0
    """RAYMODULE_ADMIT_INTERVAL_S: how often an elastic run with replacements pending asks the
    controller, at a step boundary, whether they are up to be admitted."""
    balance_every_steps: int = 50
    """RAYMODULE_BALANCE_EVERY_STEPS: with ``work_load_list="auto"``, the training steps whose
    compute times the controller sums before it may re-weight the work split."""
    allreduce_bucket_bytes: int = 4 * 1024 * 1024
    """RAYMODULE_ALLREDUCE_BUCKET_BYTES: gradients are fused into buckets of at most this size,
    one collective call each."""
    shm_allreduce: int = 1
    """RAYMODULE_SHM_ALLREDUCE: 1 sums dense gradients of CPU workers on one node through shared
    memory (and only the nodes' sums over gloo, between one worker per node); 0 sends them all
    over gloo."""
    split_update: int = 0
    """RAYMODULE_SPLIT_UPDATE: 1 splits plain SGD's update among a group's CPU workers on one
    node that sum through shared memory, when the gradient fits in one bucket
    (RAYMODULE_ALLREDUCE_BUCKET_BYTES): each updates its part of the parameters and of the
    momentum, and they share the parts there (the same bits as each updating all); 0 has
    every worker update all of them. Off by default: on 2 workers it was no faster
    (docs/performance.md), since copying the others' parts out costs about what updating them
    does."""
    pin_cores: int = 1
    """RAYMODULE_PIN_CORES: 1 runs each CPU worker of a group on a core of its own when the
    group's workers on a machine are as many as its cores, whichever Ray nodes they are on
    (:mod:`raymodule.worker.cores`); 0 leaves it to the kernel."""
    data_timeout_s: float = 300.0
    """RAYMODULE_DATA_TIMEOUT_S: bound on a worker's wait for its rows of one step: a
    dataset's samples (an ArrayDataset's arrays from the object store, RecordIO records from
    their file) or the parts of a step sent again; past it, the step fails naming what was
    not read."""
    steps_per_call: int = 32
    """RAYMODULE_STEPS_PER_CALL: the most batches sent to the workers in one call (fit, score,
    predict); a call carries as many as take them about RAYMODULE_CALL_S. 32 trains the
    benchmark's MLP on 2 workers 25-45 % faster than 4 (each call costs the workers about a
    millisecond, and the client, controller and raylet CPU on the workers' cores); callbacks
    trail the workers by up to (1 + RAYMODULE_PIPELINE_DEPTH) calls, and membership changes
    and checkpoints wait for a call's boundary."""
    call_s: float = 0.2
    """RAYMODULE_CALL_S: the workers' seconds of steps one call carries, as the last steps
    took: each call costs the workers about a millisecond of waiting, spread over its steps;
    callbacks trail the workers by up to (1 + RAYMODULE_PIPELINE_DEPTH) calls."""
    pipeline_depth: int = 2
    """RAYMODULE_PIPELINE_DEPTH: calls in flight ahead of the one whose results are read."""
    checkpoint_attempts: int = 3
    """RAYMODULE_CHECKPOINT_ATTEMPTS: tries to write one checkpoint before it counts as failed."""
    checkpoint_backoff_s: float = 1.0
    """RAYMODULE_CHECKPOINT_BACKOFF_S: wait before the second try; doubled for each next one."""
    checkpoint_snapshot_timeout_s: float = 600.0
    """RAYMODULE_CHECKPOINT_SNAPSHOT_TIMEOUT_S: how long the checkpoint writer waits for a
    worker's copy of its state; a copy that does not come is skipped, like one from a lost
    worker."""
    checkpoint_lookup_timeout_s: float = 2.0
    """RAYMODULE_CHECKPOINT_LOOKUP_TIMEOUT_S: how long the checkpoint writer asks where a
    worker's copy of its state is (its files are written to object storage from that node);
    unanswered, they are written from the training process's node."""
    checkpoint_close_timeout_s: float = 900.0
    """RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S: how long the end of ``fit`` waits for the
    checkpoints still being written; past it, fit fails saying which did not commit."""
    checkpoint_failures_tolerated: int = 3
    """RAYMODULE_CHECKPOINT_FAILURES_TOLERATED: failed checkpoints in a row that training goes
    on through; one more stops it."""
    lease_ttl_s: float = 60.0
    """RAYMODULE_LEASE_TTL_S: a run's lease on its folder not renewed for this long belongs to
    a run that died, and another run of the same name takes it over; renewed every quarter of
    it. Hosts' clocks must agree to well within it."""

    @classmethod
    def from_env(cls) -> Settings:
        values = {}
        for field in fields(cls):
            name = "RAYMODULE_" + field.name.upper()
            raw = os.environ.get(name, "")
            if raw == "":
                continue
            kind = int if field.type in ("int", int) else float
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(
                    f"{name}={raw!r} must be a{'n integer' if kind is int else ' number'}"
                ) from None
            floor = 0 if field.name in _ZERO_ALLOWED else 1e-9
            if value < floor:
                raise ValueError(f"{name}={raw!r} must be {'>= 0' if floor == 0 else '> 0'}")
            values[field.name] = value
        return cls(**values)
