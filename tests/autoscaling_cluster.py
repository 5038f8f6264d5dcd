"""An elastic run on a Ray cluster grown by Ray's own autoscaler, on one machine.

    python tests/autoscaling_cluster.py OUT_JSON

Starts a head node (no CPUs) with Ray's autoscaler and its fake multi-node provider (its nodes
are real raylets on 127.0.0.1, started when tasks or placement groups ask for resources), whose
worker nodes have 1 CPU each, at least 1 of them and, at first, at most 1. Trains an MLP on
``raymodule.workers(1, max_workers=3)``: training starts on the one worker node there is. At
one step, while every worker waits at it (a gate of :mod:`stepfaults`: faults are keyed to the
workers' own steps), this process raises the config's ceiling to 3 nodes (the autoscaler reads
its config again at each update): the workers still waiting for resources make the autoscaler
add two nodes, and they join at a step boundary. The workers wait (bounded) until those are
up, so that they join whatever this machine's speed. At a later step this process drains the
node of one of them through Ray's drain API (what the autoscaler calls to take a node away): its
worker leaves at a step boundary and the run goes on with two. Trains the same batches with plain
``mx.mod.Module`` on one device and writes what happened to OUT_JSON, with the seconds from
the raised ceiling to the nodes joining the cluster, and from there to their workers being up.
Stops every process it started, by PID, even when training fails (never ``ray stop``, which
stops every Ray on the machine), and deletes its folders.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Ray on loopback: read as ray is imported, which stepfaults (below) does first; run by hand,
# this script would otherwise reach its head node at the machine's network address
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# elastic_cluster, imported below, sets the rest: short raymodule bounds, gloo on loopback
os.environ.setdefault("RAYMODULE_PLACEMENT_TIMEOUT_S", "180")  # nodes the autoscaler starts
os.environ.setdefault("RAYMODULE_ADMIT_INTERVAL_S", "0.05")  # drains looked for: a short run
# one node for 3 workers at the start: the run starts with 1 once this wait for all 3 passed
os.environ.setdefault("RAYMODULE_START_WAIT_S", "2")

import yaml  # noqa: E402 - Ray's own dependency

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stepfaults  # noqa: E402
from conftest import max_relative_diff  # noqa: E402
from elastic_cluster import (  # noqa: E402
    Faults,
    plain_mxnet,
    read_metrics,
    replicas_equal,
    train,
)

import raymodule  # noqa: E402
from raymodule.storage import Folder  # noqa: E402

MAX_NODES = 3
WAIT_AT = 4  # the step at which the ceiling is raised, until the new workers are up
DRAIN_AT = 16 + 2  # the step at which the node of the worker of slot 1 is drained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(port: int, max_nodes: int) -> dict:
    """The autoscaler's cluster config: the fields of Ray's fake_multi_node example."""
    return {
        "cluster_name": "raymodule-test",
        "max_workers": max_nodes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {
                "resources": {"CPU": 1, "object_store_memory": 200 * 1024**2},
                "node_config": {},
                "min_workers": 1,
                "max_workers": max_nodes,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def processes_of(marks: list[str]) -> list[int]:
    """The PIDs whose command line holds one of ``marks`` (this process excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(mark in cmdline for mark in marks):
            found.append(int(entry.name))
    return found


def stop_cluster(marks: list[str]) -> None:
    """SIGTERM, then SIGKILL after a grace, to every process of the cluster, by PID."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = processes_of(marks)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.2)


def worker_nodes(ray) -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)


def run(storage: str, cfg: Path, port: int) -> dict:
    import ray

    deadline = time.monotonic() + 120
    while worker_nodes(ray) < 1:  # the config's min_workers
        if time.monotonic() > deadline:
            raise RuntimeError("the autoscaler started no worker node within 120 s")
        time.sleep(0.5)
    nodes_at_start = worker_nodes(ray)

    timings = {}

    def wait_for_workers(mod):
        up = stepfaults.workers_up(faults.marks)
        cfg.write_text(yaml.safe_dump(config(port, MAX_NODES)))
        raised = time.monotonic()
        deadline = raised + 180
        while time.monotonic() < deadline:
            if "nodes_s" not in timings and worker_nodes(ray) == MAX_NODES:
                timings["nodes_s"] = round(time.monotonic() - raised, 2)
            if stepfaults.workers_up(faults.marks) >= up + MAX_NODES - 1:
                timings["workers_up_after_nodes_s"] = round(
                    time.monotonic() - raised - timings.get("nodes_s", 0.0), 2
                )
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"the autoscaler's nodes brought up no workers within 180 s ({worker_nodes(ray)} "
            f"worker nodes; the module's workers: {mod.workers.membership})"
        )

    def drain(mod):
        from ray.core.generated import autoscaler_pb2

        if mod.world_size != MAX_NODES:
            raise RuntimeError(f"{mod.world_size} workers at {DRAIN_AT}: the others never joined")
        accepted, why = ray._raylet.GcsClient(address=f"127.0.0.1:{port}").drain_node(
            mod.workers.nodes[1]["node"],
            autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "a test's preemption notice, as the autoscaler gives one",
            int(time.time() * 1000) + 600_000,
        )
        if not accepted:
            raise RuntimeError(f"the drain was refused: {why}")

    faults = Faults(
        {(WAIT_AT, None): ("gate", "grow"), (DRAIN_AT, None): ("gate", "drain")},
        {"grow": wait_for_workers, "drain": drain},
    )
    tic = time.monotonic()
    contexts = raymodule.workers(1, max_workers=MAX_NODES)
    mod, error = train(storage, "autoscaled", faults, None, contexts, every=0)
    result = {
        "seconds": round(time.monotonic() - tic, 2),
        "nodes_at_start": nodes_at_start,
        "nodes_at_end": worker_nodes(ray),
        "fired": faults.count(),
        "error": f"{type(error).__name__}: {error}" if error else None,
        "world_size": mod.world_size,
        **timings,
    }
    if error is None:
        arg, aux = mod.get_params()
        result["diff"] = max_relative_diff(plain_mxnet(), {**arg, **aux})
        result["replicas_equal"] = replicas_equal(mod)
    mod.close()
    result["metrics"] = read_metrics(Folder(storage).child("autoscaled"))
    return result


def main() -> None:
    out = sys.argv[1]
    temp = tempfile.mkdtemp(prefix="ras-", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    cfg = Path(temp, "autoscaling.yaml")
    cfg.write_text(yaml.safe_dump(config(port, 1)))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    marks = [temp, f"127.0.0.1:{port}"]
    storage = tempfile.mkdtemp(prefix="autoscaled-")
    try:
        subprocess.run(
            [
                sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                f"--autoscaling-config={cfg}", "--node-ip-address=127.0.0.1", f"--port={port}",
                "--num-cpus=0", f"--temp-dir={temp}", "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            env=env, check=True, timeout=120, capture_output=True,
        )  # fmt: skip
        import ray

        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        try:
            result = run(storage, cfg, port)
        finally:
            ray.shutdown()
    finally:
        stop_cluster(marks)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
