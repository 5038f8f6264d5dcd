"""Where a raymodule worker's training step spends its time, phase by phase.

Runs ``raymodule.Module.fit`` on 2 workers (or ``--workers``) of one of jobs/benchmark.py's
models, with every worker timing each phase of its training steps:

    read       waiting for the step's rows (the object store, or a dataset's read-ahead)
    forward    copying the rows into the executor and running forward
    backward   backward
    reduce     summing the gradients across the workers (Collective.reduce, or
               Collective.reduce_shared where the update reads the sums in the node's
               shared memory); with the update split among a node's workers
               (Collective.reduce_and_update), the sum and the sharing of the updated parts
    update     the rest of the worker's update: the optimizer's update of the summed
               gradients (of its part of them, when split)
    metric     the metric's counters (or the outputs, for a metric the client computes)
    between    no step running: the worker waits for the controller's next call

To tell the phases apart, each worker waits for MXNet's engine (``mx.nd.waitall``) at every
phase boundary, which takes away the overlap of backward with the reduction: the timed run is
slower than an untimed one, and the table gives the untimed run's samples/s beside the
timed run's for that reason. The timing is added by a Ray worker setup hook that wraps the
worker's methods in its process; raymodule itself is not changed.

With ``--clock cpu`` each phase is instead the CPU time of the worker's main thread (the one
that drives the step: Python, and the C calls it makes), nothing waited for: MXNet's engine
thread, which computes the operators, and the thread that sums the gradients (its copies and
additions) are not counted, except with the update split (RAYMODULE_SPLIT_UPDATE=1), whose
sum runs on the main thread and counts under "reduce"; "between" is then Ray's own work
between calls.

Run locally (starts a Ray on 127.0.0.1 with 4 logical CPUs, in a temporary folder, and stops
it at the end):

    python jobs/step_phases.py
    python jobs/step_phases.py --model lenet --data dataset
    python jobs/step_phases.py --clock cpu   # the main thread's CPU time a phase
    RAYMODULE_SHM_ALLREDUCE=0 python jobs/step_phases.py   # gradients summed over gloo only

Run on a Ray cluster (the workers may be on any of its nodes; each sends its record to the
job's driver when its last step ends):

    ray job submit --working-dir . -- python jobs/step_phases.py --model lenet
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload  # noqa: E402 - jobs/ is not a package: its models and thread settings

PHASES = ["read", "forward", "backward", "reduce", "update", "metric", "between"]
RECORDER_ENV = "RAYMODULE_STEP_PHASES_RECORDER"
STEPS_ENV = "RAYMODULE_STEP_PHASES_STEPS"
CLOCK_ENV = "RAYMODULE_STEP_PHASES_CLOCK"


class Recorder:
    """The named actor each timed worker sends its phase record to, once its last step ends."""

    def __init__(self):
        self.records: list[dict] = []

    def put(self, record: dict) -> None:
        self.records.append(record)

    def get(self) -> list[dict]:
        return self.records


def install_timers() -> None:
    """The worker setup hook: wraps ModuleWorker's step methods and its group's reduction so that
    each phase's seconds are summed, and sent to the actor named ``$RAYMODULE_STEP_PHASES_RECORDER``
    at the end of the call of steps that runs the ``$RAYMODULE_STEP_PHASES_STEPS``-th step."""
    recorder = os.environ.get(RECORDER_ENV)
    if not recorder:
        return
    total = int(os.environ[STEPS_ENV])
    import mxnet as mx
    import ray

    from raymodule.worker import actor

    actor._import_runtime()  # the methods wrapped here read the names it binds
    if os.environ.get(CLOCK_ENV) == "cpu":  # the main thread's CPU time, nothing waited for
        clock_s, settle = time.thread_time, lambda: None
    else:
        clock_s, settle = time.perf_counter, mx.nd.waitall
    seconds = dict.fromkeys(PHASES, 0.0)
    counts = {"steps": 0}
    clock = {"returned": None}
    steps = actor.ModuleWorker.steps

    def timed(reduce):
        """``reduce`` (a Collective's ``reduce`` or ``reduce_shared``), its seconds summed
        under "reduce"."""

        def timed_reduce(*args):
            settle()
            tic = clock_s()
            try:
                return reduce(*args)
            finally:
                seconds["reduce"] += clock_s() - tic

        timed_reduce.timed = True
        return timed_reduce

    def timed_split(reduce_and_update):
        """``reduce_and_update`` (a Collective's, for an update split among a node's
        workers): its seconds summed under "reduce" but for its update of this worker's part,
        which counts as "update"."""

        def timed_reduce_and_update(grads, update, groups):
            settle()
            updating = {"s": 0.0}

            def timed_update(lo, hi):
                tic = clock_s()
                update(lo, hi)
                updating["s"] += clock_s() - tic

            tic = clock_s()
            try:
                return reduce_and_update(grads, timed_update, groups)
            finally:
                seconds["reduce"] += clock_s() - tic - updating["s"]

        timed_reduce_and_update.timed = True
        return timed_reduce_and_update

    def timed_train_step(self, mid, batch):
        began = clock_s()
        seconds["read"] += began - clock["step_end"]
        mod, labels = self._load(mid, batch, True)
        settle()
        loaded = clock_s()
        seconds["forward"] += loaded - began
        mod.backward()
        settle()
        backed = clock_s()
        seconds["backward"] += backed - loaded
        group = self._collective
        if group.has_peers and not hasattr(group.reduce, "timed"):
            group.reduce = timed(group.reduce)  # this group's; a re-formed one is new
            group.reduce_shared = timed(group.reduce_shared)
            group.reduce_and_update = timed_split(group.reduce_and_update)
        before_reduce = seconds["reduce"]
        self.update(mid)
        settle()
        updated = clock_s()
        seconds["update"] += updated - backed - (seconds["reduce"] - before_reduce)
        result = self._step_metric(mod, labels) if self._metric is not None else None
        clock["step_end"] = clock_s()
        seconds["metric"] += clock["step_end"] - updated
        counts["steps"] += 1
        return result

    def timed_steps(self, kind, *args, **kwargs):
        called = clock_s()
        if clock["returned"] is not None:
            seconds["between"] += called - clock["returned"]
        clock["step_end"] = called
        try:
            return steps(self, kind, *args, **kwargs)
        finally:
            clock["returned"] = clock_s()
            if kind == "train_step" and counts["steps"] == total:
                ray.get_actor(recorder).put.remote({"seconds": seconds, **counts})

    actor.ModuleWorker.train_step = timed_train_step
    actor.ModuleWorker.steps = timed_steps


def run(args, timed: bool) -> tuple[float, list[dict]]:
    """One fit: samples/s over the epochs after the first, and each worker's phase record."""
    import mxnet as mx
    import numpy as np
    import ray

    import raymodule

    name = f"step-phases-{os.getpid()}-{time.time_ns()}"
    env = {RECORDER_ENV: name, STEPS_ENV: str(args.batches * args.epochs), CLOCK_ENV: args.clock}
    env = env if timed else {}
    runtime_env = {"worker_process_setup_hook": install_timers, "env_vars": env}
    own_tmp = None if os.environ.get("RAY_ADDRESS") else tempfile.mkdtemp(prefix="rs-")
    try:
        if own_tmp is None:  # under `ray job submit`: join the cluster in RAY_ADDRESS
            ray.init(runtime_env=runtime_env)
        else:  # a new private cluster, never someone else's `ray start` one
            os.environ["RAY_TMPDIR"] = own_tmp
            ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env=runtime_env)
        recorder = ray.remote(num_cpus=0)(Recorder).options(name=name).remote()
        batch = workload.MODELS[args.model]
        shape = workload.SHAPES[args.model]
        rng = np.random.default_rng(0)
        x = rng.random((batch * args.batches, *shape), dtype=np.float32)
        y = rng.integers(0, 10, batch * args.batches).astype(np.float32)
        if args.data == "dataset":
            data = raymodule.data.ArrayDataset(x, y)
            train = raymodule.data.DatasetIter(data, batch, label_name="softmax_label")
        else:
            train = mx.io.NDArrayIter(x, y, batch, label_name="softmax_label")
        ctx = [mx.cpu(i) for i in range(args.workers)]
        mod = raymodule.Module(workload.build_symbol(mx, args.model), context=ctx)
        marks: list[float] = []
        mod.fit(
            train,
            num_epoch=args.epochs,
            optimizer="sgd",
            optimizer_params={"learning_rate": 0.01, "momentum": 0.9, "rescale_grad": 1 / batch},
            epoch_end_callback=lambda *_: marks.append(time.perf_counter()),
        )
        mod.close()
        rate = batch * args.batches * (len(marks) - 1) / (marks[-1] - marks[0])
        records = ray.get(recorder.get.remote(), timeout=60)
        deadline = time.monotonic() + 30  # each worker's put is sent without waiting for it
        while timed and len(records) < args.workers and time.monotonic() < deadline:
            time.sleep(0.2)
            records = ray.get(recorder.get.remote(), timeout=60)
        if timed and len(records) != args.workers:
            raise RuntimeError(f"{len(records)} of {args.workers} workers sent their phases")
        return rate, records
    finally:
        ray.shutdown()
        if own_tmp is not None:
            shutil.rmtree(own_tmp, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    workload.add_model_option(parser)
    parser.add_argument("--workers", type=int, default=2, help="raymodule workers (default 2)")
    parser.add_argument(
        "--data",
        default="ndarrayiter",
        choices=["ndarrayiter", "dataset"],
        help="mx.io.NDArrayIter (the drop-in path) or raymodule.data.DatasetIter (default "
        "ndarrayiter)",
    )
    parser.add_argument(
        "--batches", type=int, default=100, help="global batches per epoch (default 100)"
    )
    parser.add_argument(
        "--epochs", type=int, default=6, help="epochs; the first is warm-up (default 6)"
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: each phase's seconds, MXNet's engine waited for at its end; cpu: the CPU "
        "time of the worker's main thread in it, nothing waited for (default wall)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.batches < 1 or args.epochs < 2:
        parser.error("--workers and --batches must be >= 1, --epochs >= 2")
    os.environ.update(workload.THREAD_ENV)
    os.environ.update(workload.RAY_ENV)

    untimed, _ = run(args, timed=False)
    timed, records = run(args, timed=True)
    print(
        f"{args.model}, {args.workers} workers, {args.data}, global batch "
        f"{workload.MODELS[args.model]}: {untimed:,.0f} samples/s untimed, {timed:,.0f} "
        + ("timed (phases waited for)" if args.clock == "wall" else "with the CPU clocks read")
    )
    what = "ms" if args.clock == "wall" else "ms of the worker's main thread's CPU"
    print(f"{what} per step, per worker (all steps of the run, warm-up included):")
    header = ["worker"] + PHASES + ["total"]
    rows = []
    for k, record in enumerate(sorted(records, key=lambda r: -r["steps"])):
        per_step = {p: 1e3 * record["seconds"][p] / max(record["steps"], 1) for p in PHASES}
        rows.append([str(k)] + [f"{per_step[p]:.2f}" for p in PHASES])
        rows[-1].append(f"{sum(per_step.values()):.2f}")
    if len(rows) > 1:
        means = [statistics.fmean(float(r[i]) for r in rows) for i in range(1, len(header))]
        rows.append(["mean"] + [f"{m:.2f}" for m in means])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
