"""Elastic training on a real multi-node Ray on one machine, under real faults.

    python tests/elastic_cluster.py SCENARIO OUT_JSON
    python tests/elastic_cluster.py --serve     (then "SCENARIO OUT_JSON" lines on stdin)

Starts a ``ray.cluster_utils.Cluster`` (a head without CPUs and three nodes of 1 CPU, fast
health checks, on 127.0.0.1), trains an MLP on three workers (one per node) through an elastic
run, injects SCENARIO's fault keyed to the workers' own step (never to the clock, nor to the
client's trailing callbacks: :mod:`stepfaults`), trains the same batches with plain
``mx.mod.Module`` on one device, and writes what happened to OUT_JSON.
Stops every Ray process it started, even when training fails. With ``--serve``, one cluster
runs the scenarios named on stdin one after another (:func:`serve`), replacing the nodes a
scenario removed or drained.

Scenarios: kill (SIGKILL one worker process), node (remove a worker's node for real),
hang (SIGSTOP one worker: alive, silent), grow (remove a node, add one back later),
floor (remove a node with min_workers=3 and no node coming), floor_stop and floor_stop_rows
(floor, and then SIGTERM to this process, the training process: a preemption notice; batches
read in this process, or rows the workers read), floor_stop_callback (floor_stop_rows, the
SIGTERM sent by a batch_end_callback that then reads the parameters: the client waits on that
call when the controller waits for a node), all (SIGKILL every worker:
the run goes on from its latest checkpoint), process (SIGKILL the training process itself
mid-run, run it again with the same name), drain (Ray's drain API, as an autoscaler's
preemption drain calls it, on one worker's node: that worker leaves at a step boundary),
controller (kill the controller actor: its workers go with it, and the run goes on from its
latest checkpoint), s3stop (the run's storage is an
S3 server, SIGSTOPped; then a worker is SIGKILLed: the survivors go on without reading storage,
and the server is resumed steps later; a wider MLP, whose checkpoints' files are written from
the node holding worker 0's snapshot), s3keys (the run's storage an S3 server whose keys the
worker nodes have wrong: the files are written from the driver's node instead),
start_small (one worker node for ``raymodule.workers(1, max_workers=3)``: training starts with
one worker, two nodes are added, and their workers join), none (no fault).

Faults that the workers fire at a call of their own, armed at a step (:mod:`stepfaults`):
epoch_end (worker 0 dies reading the parameters at the epoch's end), admit (a survivor dies
while a replacement is admitted), reform_kill and reform_stop (one worker is killed; another
dies, or stops answering, while the group re-forms without it), frozen (worker 0 stops
answering with max_failures=0: fit fails in words, bounded, instead of hanging).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from functools import partial
from unittest import mock

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAYMODULE_COLLECTIVE_TIMEOUT_S", "4")
os.environ.setdefault("RAYMODULE_MIN_WORKERS_WAIT_S", "4")
os.environ.setdefault("RAYMODULE_PLACEMENT_REPORT_INTERVAL_S", "5")
os.environ.setdefault("RAYMODULE_PLACEMENT_TIMEOUT_S", "120")
# the workers start together, as the scenarios expect, though this machine is busy: not one by
# one once the wait for their placement group passed, the late one joining later (in a loss's
# recovery, say, which then announces 3 workers, not 2); start_small and
# tests/autoscaling_cluster.py, which have no room for them at first, set their own
os.environ.setdefault("RAYMODULE_START_WAIT_S", "60")
# membership changes wait for a call's boundary: 4 boundaries in an epoch of 16 batches
os.environ.setdefault("RAYMODULE_STEPS_PER_CALL", "4")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stepfaults  # noqa: E402
from conftest import ClientIter, cores_of, dataset, max_relative_diff, mlp  # noqa: E402
from s3server import SeaweedS3  # noqa: E402

import raymodule  # noqa: E402
import raymodule.module  # noqa: E402
from raymodule.storage import Folder  # noqa: E402

WORKERS = 3
BATCH = 24  # splits evenly over 3 and over 2 workers
EPOCHS = 2
HIDDEN = (32, 16)  # the MLP's hidden layers
WIDE = (256, 128)  # s3stop's: 40k parameters, so that a snapshot (with the momentum, 310 KB) is
# above the 100 KB that Ray keeps in its owner's memory, and lives in its maker's node's store
FAULT_STEP = 6  # the workers fire the fault as they are about to run this step (epoch 0)
GROW_STEP = 16 + 2  # the grow scenario adds a node back here (batch 2 of epoch 1)
S3_BACK_STEP = 10  # the s3stop scenario resumes the storage server here
# A replacement the grow scenarios wait for is up once it answered the controller's describe,
# whose reply may still be on its way when the workers go on: the controller looks for it
# again at every step after (a call a step, none ahead), not once in the epoch's last call.
ADMIT_AT_EVERY_STEP = {
    "RAYMODULE_ADMIT_INTERVAL_S": "0.01",
    "RAYMODULE_STEPS_PER_CALL": "1",
    "RAYMODULE_PIPELINE_DEPTH": "0",
}
WHOLE_S = 60  # the most a cluster may take to be whole again after a scenario (--serve)
# A removed node is declared dead after ~5 s (the default is ~30 s); tighter bounds make a
# node on a busy 2-core machine miss its checks and die on its own.
HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 5,
}


def batches():
    x, y = dataset(n=BATCH * 16, shape=(20,), seed=3)
    return ClientIter(x, y, batch_size=BATCH, shuffle=False)


def rows():
    """:func:`batches`' batches in a plain NDArrayIter: fit reads it as rows, which the
    workers read (a plan the controller runs)."""
    x, y = dataset(n=BATCH * 16, shape=(20,), seed=3)
    return mx.io.NDArrayIter(x, y, batch_size=BATCH, shuffle=False)


def optimizer_params():
    return {"learning_rate": 0.1, "momentum": 0.9}


def plain_mxnet(hidden=HIDDEN) -> dict:
    """The same training by plain MXNet on one device: what every run must end with."""
    mx.random.seed(0)
    mod = mx.mod.Module(mlp(hidden), context=mx.cpu())
    mod.fit(batches(), num_epoch=EPOCHS, optimizer_params=optimizer_params())
    arg, aux = mod.get_params()
    return {**arg, **aux}


def train(
    storage,
    name,
    faults=None,
    min_workers=2,
    contexts=WORKERS,
    max_failures=3,
    every=4,
    epoch_end_callback=None,
    hidden=HIDDEN,
    data=None,
    batch_end_callback=None,
):
    """The elastic run under ``faults`` (a :class:`Faults`, or None) of ``data`` (by default
    :func:`batches`); returns the module (still open) and the exception it raised, if any.
    ``batch_end_callback(mod)`` gives fit's batch_end_callback, if any."""
    mx.random.seed(0)
    if isinstance(contexts, int):
        contexts = [mx.cpu(i) for i in range(contexts)]
    faults = faults or Faults({}, {})
    raymodule.module.ControllerHandle = stepfaults.with_workers(
        stepfaults.worker_class(faults.plan, faults.marks)
    )
    mod = raymodule.Module(mlp(hidden), context=contexts)
    gates = stepfaults.Gates(faults.marks, {n: partial(a, mod) for n, a in faults.actions.items()})
    try:
        with gates:
            mod.fit(
                batches() if data is None else data,
                num_epoch=EPOCHS,
                optimizer_params=optimizer_params(),
                epoch_end_callback=epoch_end_callback,
                batch_end_callback=batch_end_callback and batch_end_callback(mod),
                run=raymodule.RunConfig(
                    name=name,
                    storage=storage,
                    checkpoint_every=every,
                    keep=2 if every else 10,
                    min_workers=min_workers,
                    max_failures=max_failures,
                ),
            )
    except Exception as err:  # noqa: BLE001 - reported to the test
        traceback.print_exc()
        return mod, err
    finally:
        faults.fired.update(gates.fired)
        for error in gates.errors:
            print(f"a gate's action failed:\n{error}", file=sys.stderr)
    return mod, None


class Faults:
    """A scenario's faults, keyed to the workers' own steps (:mod:`stepfaults`): ``plan`` is
    what the workers fire, ``actions[name](mod)`` what this process does while every worker
    waits at gate ``name``. ``fired`` counts each gate's action, and each worker fault by its
    (step, rank)."""

    def __init__(self, plan: dict, actions: dict, marks: str | None = None):
        self.plan, self.actions = plan, actions
        if marks is None:  # removed when this process ends
            marks = tempfile.mkdtemp(prefix="faults-")
            atexit.register(shutil.rmtree, marks, True)
        self.marks = marks
        self.fired: dict = {}

    def count(self) -> list[int]:
        """How many times each fault fired, in the plan's order then the actions'."""
        worker_faults = [
            int(stepfaults.fired(self.marks, step, rank))
            for step, rank in self.plan
            if rank is not None  # a gate (every rank) counts as its action
        ]
        return worker_faults + [self.fired.get(name, 0) for name in self.actions]


def replicas_equal(mod) -> bool:
    per_worker = mod.workers.call("get_params", mod._id)
    first = per_worker[0]
    return all(
        all(np.array_equal(first[i][k], other[i][k]) for k in first[i])
        for other in per_worker[1:]
        for i in (0, 1)
    )


class CommitLog(logging.Handler):
    """What the checkpoint writer says: the node each committed checkpoint's files came from,
    and its warnings."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.nodes: list[str] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("checkpoint %s committed"):
            self.nodes.append(record.args[-1])
        if record.levelno >= logging.WARNING:
            self.warnings.append(record.getMessage())


def run_scenario(scenario: str, cluster, storage: str, s3: SeaweedS3 | None = None) -> dict:
    import ray

    nodes = {n.node_id: n for n in cluster.list_all_nodes()}
    victim = 1  # the rank whose worker the fault hits

    def kill(mod):
        os.kill(mod.workers.nodes[victim]["pid"], signal.SIGKILL)

    def kill_all(mod):
        for node in mod.workers.nodes:
            os.kill(node["pid"], signal.SIGKILL)

    def remove_node(mod):
        """Removes the victim's node, and returns once Ray knows it is dead: a replacement
        the recovery starts then waits for a node, instead of being sent to the dead one."""
        node_id = mod.workers.nodes[victim]["node"]
        cluster.remove_node(nodes[node_id], allow_graceful=False)
        deadline = time.monotonic() + 60
        while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node_id[:8]} still alive 60 s after its removal")
            time.sleep(0.1)

    def drain_node(mod):
        from ray.core.generated import autoscaler_pb2

        gcs = ray._raylet.GcsClient(address=cluster.address)
        accepted, why = gcs.drain_node(
            mod.workers.nodes[victim]["node"],
            autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "a test's preemption notice",
            int(time.time() * 1000) + 600_000,  # the deadline: the node is not stopped here
        )
        assert accepted, why
        # the workers wait at the gate until the controller may look for drains again: it
        # sees this one in the call after the gate, whatever the machine's speed
        time.sleep(2 * float(os.environ["RAYMODULE_ADMIT_INTERVAL_S"]))

    def add_nodes(count, faults):
        def add(mod):
            up = stepfaults.workers_up(faults.marks)
            # from the gates' thread: Ray's Node sets a SIGTERM handler, which only the main
            # thread may; this process stops its nodes itself (cluster.shutdown)
            with mock.patch.object(ray._private.utils, "set_sigterm_handler", lambda h: None):
                for _ in range(count):
                    cluster.add_node(num_cpus=1)
            deadline = time.monotonic() + 120  # until the workers are up on them (not admitted)
            while stepfaults.workers_up(faults.marks) < up + count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {count} workers came up on the added nodes")
                time.sleep(0.05)

        return add

    storage_back = []  # who resumed the stopped storage server: "step", or the guard

    def stop_storage(mod):
        os.killpg(s3.proc.pid, signal.SIGSTOP)
        # bounded: if training waited on storage, no later step would resume it
        guard = threading.Timer(120, resume_storage, ("guard",))
        guard.daemon = True
        guard.start()

    def resume_storage(by):
        if s3 is not None and not storage_back:
            storage_back.append(by)
            os.killpg(s3.proc.pid, signal.SIGCONT)

    def sigterm_self(mod):
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs in the main thread, in fit

    removed = threading.Event()  # floor_stop_callback: the victim's node is gone

    def sigterm_then_read_params(mod):
        """floor_stop_callback's batch_end_callback: after the last batch before the gate
        where the node is removed, it waits for the removal, sends this process SIGTERM and
        reads the parameters: the controller answers once it stopped waiting for a node."""

        def callback(param):
            if (param.epoch, param.nbatch) == (0, FAULT_STEP - 1):
                if not removed.wait(120):
                    raise RuntimeError("the victim's node was not removed within 120 s")
                sigterm_self(mod)
                mod.get_params()

        return callback

    def then(*actions):
        def both(mod):
            for action in actions:
                action(mod)

        return both

    def gate(name, step=FAULT_STEP):
        """Every worker waits at the start of ``step`` while this process acts."""
        return {(step, None): ("gate", name)}

    min_workers, max_failures, every, contexts, hidden = 2, 3, 4, WORKERS, HIDDEN
    data, waits = None, {}  # the batches (None: batches()); settings for this scenario only
    batch_end_callback = None
    if scenario == "kill":
        faults = Faults({(FAULT_STEP, victim): "die"}, {})
    elif scenario == "hang":
        faults = Faults({(FAULT_STEP, victim): "stop"}, {})
    elif scenario in ("node", "floor", "floor_stop", "floor_stop_rows", "floor_stop_callback"):
        faults = Faults(gate("remove"), {"remove": remove_node})
        min_workers = 2 if scenario == "node" else 3
        if scenario.startswith("floor_stop"):  # SIGTERM as the run waits for a node
            faults.actions["remove"] = then(remove_node, sigterm_self)
            waits["RAYMODULE_MIN_WORKERS_WAIT_S"] = "120"  # fit would fail after it
            data = rows() if scenario != "floor_stop" else None
        if scenario == "floor_stop_callback":
            faults.actions["remove"] = then(remove_node, lambda mod: removed.set())
            batch_end_callback = sigterm_then_read_params
            # the reply of the batch before the gate comes while the workers wait there
            waits["RAYMODULE_STEPS_PER_CALL"] = "1"
    elif scenario == "grow":
        waits.update(ADMIT_AT_EVERY_STEP)
        faults = Faults(
            {**gate("remove"), **gate("add", GROW_STEP)}, {"remove": remove_node, "add": None}
        )
        faults.actions["add"] = add_nodes(1, faults)
    elif scenario in ("all", "controller"):
        if scenario == "all":
            faults = Faults(gate("kill all"), {"kill all": kill_all})
        else:
            faults = Faults(gate("kill"), {"kill": lambda mod: ray.kill(mod.workers.controller)})
        min_workers = 1
    elif scenario == "epoch_end":  # armed in epoch 0, fired reading the parameters at its end
        faults = Faults({(FAULT_STEP, 0): ("arm", "get_params", "die")}, {})
    elif scenario == "admit":  # ranks after the loss of slot 1: [slot 0, slot 2]
        waits.update(ADMIT_AT_EVERY_STEP)
        plan = {**gate("remove"), **gate("add", GROW_STEP)}
        plan[(GROW_STEP, 1)] = ("arm", "applied", "die")
        faults = Faults(plan, {"remove": remove_node, "add": None})
        faults.actions["add"] = add_nodes(1, faults)
        min_workers = 1
    elif scenario in ("reform_kill", "reform_stop"):
        how = "die" if scenario == "reform_kill" else "stop"
        faults = Faults({(FAULT_STEP, 2): ("arm", "leave", how), (FAULT_STEP, victim): "die"}, {})
        min_workers = 1
    elif scenario == "sigterm":  # no failure allowed; checkpoints only at epoch ends
        faults = Faults({(2, victim): "term"}, {})
        max_failures, every = 0, 0
    elif scenario == "s3stop":
        hidden = WIDE  # its snapshots are in the worker's node's object store, as a model's
        # where the files are written from is asserted: never the driver's for want of an
        # answer to where a snapshot is (2 s by default) on a busy machine
        waits["RAYMODULE_CHECKPOINT_LOOKUP_TIMEOUT_S"] = "60"
        faults = Faults(
            {**gate("stop and kill"), **gate("resume", S3_BACK_STEP)},
            {
                "stop and kill": then(stop_storage, kill),
                "resume": lambda mod: resume_storage("step"),
            },
        )
    elif scenario == "s3keys":  # the worker nodes' keys are refused (loopback_cluster)
        hidden = WIDE
        faults = Faults({}, {})
    elif scenario == "drain":  # drains are looked for every admit interval: this run is short
        os.environ["RAYMODULE_ADMIT_INTERVAL_S"] = "0.05"
        faults = Faults(gate("drain"), {"drain": drain_node})
        # checkpoints at epoch ends, and where the worker leaves: mid-epoch, the client
        # sending no step ahead of those run (else the epoch's 16 are sent before the drain)
        every = 0
        os.environ["RAYMODULE_STEPS_PER_CALL"] = "1"
        os.environ["RAYMODULE_PIPELINE_DEPTH"] = "0"
    elif scenario == "start_small":  # the floor is the contexts' own: 1
        # looked for often: two workers up a poll apart both join before the run ends
        os.environ["RAYMODULE_ADMIT_INTERVAL_S"] = "0.05"
        os.environ["RAYMODULE_START_WAIT_S"] = "2"  # no room for 3: starts with 1 after it
        contexts = raymodule.workers(1, max_workers=WORKERS)
        faults = Faults(gate("add"), {"add": None})
        faults.actions["add"] = add_nodes(WORKERS - 1, faults)
        min_workers = None
    elif scenario == "frozen":
        faults = Faults({(FAULT_STEP, 0): "stop"}, {})
        max_failures = 0
    elif scenario == "none":
        faults = Faults({}, {})
    else:
        raise ValueError(f"no scenario {scenario!r} (see this file's docstring)")
    ended = []  # the epochs whose end the callback saw: fit reads the parameters for it
    commits = CommitLog()
    writer_log = logging.getLogger("raymodule.checkpoint.writer")
    level = writer_log.level
    writer_log.addHandler(commits)
    writer_log.setLevel(logging.INFO)
    tic = time.monotonic()
    sigterms = []  # fit hands a SIGTERM on once it stopped: to this handler, not the default
    previous = None
    if scenario.startswith("floor_stop"):
        previous = signal.signal(signal.SIGTERM, lambda *_: sigterms.append(1)) or signal.SIG_DFL
    try:
        with mock.patch.dict(os.environ, waits):
            mod, error = train(
                storage,
                scenario,
                faults,
                min_workers,
                contexts,
                max_failures,
                every,
                lambda epoch, symbol, arg, aux: ended.append(epoch),
                hidden,
                data,
                batch_end_callback,
            )
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    writer_log.removeHandler(commits)
    writer_log.setLevel(level)
    resume_storage("end")  # a run that failed before S3_BACK_STEP
    result = {
        "scenario": scenario,
        "storage_back": storage_back,
        "seconds": round(time.monotonic() - tic, 2),
        "fired": faults.count(),
        "error": f"{type(error).__name__}: {error}" if error else None,
        "world_size": mod.world_size,
        "sigterms": len(sigterms),
        "epoch_ends": ended,
        "driver_node": ray.get_runtime_context().get_node_id(),
        "written_from": commits.nodes,  # of each committed checkpoint, in order
        "writer_warnings": commits.warnings,
    }
    if error is None:
        arg, aux = mod.get_params()
        result["diff"] = max_relative_diff(plain_mxnet(hidden), {**arg, **aux})
        result["replicas_equal"] = replicas_equal(mod)
        # the cores each worker's threads may run on, in rank order, and this machine's
        result["cores"] = [sorted(map(sorted, cores_of(n["pid"]))) for n in mod.workers.nodes]
        result["allowed"] = sorted(os.sched_getaffinity(0))
        result["worker_nodes"] = [n["node"] for n in mod.workers.nodes]  # in rank order
    mod.close()
    run_folder = Folder(storage).child(scenario)
    result["metrics"] = read_metrics(run_folder)
    result["checkpoints"] = sorted(n for n in run_folder.folders() if n.startswith("ckpt-"))
    return result


def read_metrics(run_folder) -> list[dict]:
    if not run_folder.exists("metrics.jsonl"):
        return []
    return [json.loads(line) for line in run_folder.read("metrics.jsonl").splitlines()]


def process_scenario(cluster, storage: str) -> dict:
    """Kills a training process (a driver of the cluster) mid-run and runs it again."""
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", storage]
    first = subprocess.run(cmd + ["kill"], env=env, capture_output=True, text=True, timeout=300)
    second = subprocess.run(cmd + ["go"], env=env, capture_output=True, text=True, timeout=300)
    result = {
        "scenario": "process",
        "first_rc": first.returncode,
        "second_rc": second.returncode,
        "first_log": first.stdout[-3000:] + first.stderr[-3000:],
        "second_log": second.stdout[-3000:] + second.stderr[-3000:],
        "fired": [int("killing the training process" in first.stdout)],
    }
    if second.returncode == 0:
        params = mx.nd.load(os.path.join(storage, "process.params"))
        got = {k.split(":", 1)[1]: v for k, v in params.items()}
        result["diff"] = max_relative_diff(plain_mxnet(), got)
    result["metrics"] = read_metrics(Folder(storage).child("process"))
    return result


def child(storage: str, mode: str) -> None:
    """The training process of the ``process`` scenario (joins the cluster at RAY_ADDRESS)."""
    run_folder = os.path.join(storage, "process")

    def kill_self(mod):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # once a checkpoint inside epoch 1 is committed
            ckpt = raymodule.latest_checkpoint(run_folder)
            if ckpt is not None and ckpt.epoch == 1 and ckpt.batch > 0:
                print("killing the training process", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.05)

    steps_per_epoch = len(list(batches()))
    faults = None
    if mode == "kill":  # while every worker waits at batch 6 of epoch 1
        # no call ahead of the one read: the checkpoint at batch 4 is then the newest asked for
        # when the workers stop at batch 6 (a newer one would wait for them, superseding it)
        os.environ["RAYMODULE_PIPELINE_DEPTH"] = "0"
        marks = os.path.join(storage, "faults")  # in the storage main() removes: it is killed
        os.makedirs(marks, exist_ok=True)
        faults = Faults({(steps_per_epoch + 6, None): ("gate", "kill")}, {"kill": kill_self}, marks)
    mod, error = train(storage, "process", faults)
    if error is not None:
        raise error
    mod.save_params(os.path.join(storage, "process.params"))
    mod.close()


@contextlib.contextmanager
def loopback_cluster(worker_nodes: int, driver: bool, node_env: dict | None = None):
    """A head without CPUs and ``worker_nodes`` nodes of 1 CPU (whose processes see
    ``node_env`` over this process's environment); with ``driver``, this process connected
    to it. Stops every Ray process it started, whatever happens."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH},
    )
    try:
        if driver:
            # before the other nodes exist: the driver then uses the head's raylet, and the
            # nodes the faults remove are never the driver's own
            ray.init(address=cluster.address, log_to_driver=False)
        with mock.patch.dict(os.environ, node_env or {}):  # a node's processes inherit it
            for _ in range(worker_nodes):
                cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def wait_until_whole(timeout_s: float = WHOLE_S) -> None:
    """Returns once the cluster is as a scenario found it: its worker nodes alive and every
    CPU free (the run's workers gone); raises after ``timeout_s``."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
        free = ray.available_resources().get("CPU", 0)
        if len(nodes) == WORKERS and free >= WORKERS:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the cluster is not whole {timeout_s:g} s after a scenario: {len(nodes)} of "
                f"{WORKERS} worker nodes alive, {free:g} of {WORKERS} CPUs free"
            )
        time.sleep(0.1)


def replace_lost_nodes(cluster) -> None:
    """Removes the worker nodes a scenario killed or drained (a drained node stops once it is
    idle; one still draining takes no work) and adds as many as the cluster then lacks."""
    import ray

    from raymodule.controller.group import _draining_nodes

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - _draining_nodes()
    for node in [n for n in cluster.worker_nodes if n.node_id not in alive]:
        cluster.remove_node(node, allow_graceful=False)
    for _ in range(WORKERS - len(cluster.worker_nodes)):
        cluster.add_node(num_cpus=1)


def serve(cluster) -> None:
    """Runs the scenarios stdin names ("SCENARIO OUT_JSON", a line each) one after another on
    ``cluster``, each in a storage folder of its own; each result is written once the cluster
    is whole again (:func:`replace_lost_nodes`), so the next scenario finds it as the first
    did. Ends at stdin's end."""
    for line in sys.stdin:
        if not line.strip():
            continue
        scenario, out = line.rstrip("\n").split(" ", 1)
        storage = tempfile.mkdtemp(prefix="elastic-")
        try:
            with mock.patch.dict(os.environ):  # what a scenario sets is its own
                result = run_scenario(scenario, cluster, storage)
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        replace_lost_nodes(cluster)
        wait_until_whole()
        write_result(out, result)


def write_result(out: str, result: dict) -> None:
    """``result`` as JSON at ``out``, whole or not at all (a reader waits for the file)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(out + ".part", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(out + ".part", out)


def main() -> None:
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    if sys.argv[1] == "--serve":
        with loopback_cluster(WORKERS, driver=True) as cluster:
            serve(cluster)
        return
    scenario, out = sys.argv[1], sys.argv[2]
    s3 = SeaweedS3().start() if scenario in ("s3stop", "s3keys") else None
    storage = s3.uri("elastic") if s3 is not None else tempfile.mkdtemp(prefix="elastic-")
    nodes = 1 if scenario == "start_small" else WORKERS
    try:
        wrong_keys = {"AWS_SECRET_ACCESS_KEY": "not-the-servers"} if scenario == "s3keys" else None
        with loopback_cluster(nodes, scenario != "process", wrong_keys) as cluster:
            if scenario == "process":
                result = process_scenario(cluster, storage)
            else:
                result = run_scenario(scenario, cluster, storage, s3)
    finally:
        if s3 is not None:
            os.killpg(s3.proc.pid, signal.SIGCONT)  # a stopped server ignores SIGTERM
            s3.stop()
        else:
            shutil.rmtree(storage, ignore_errors=True)
    write_result(out, result)


if __name__ == "__main__":
    main()
