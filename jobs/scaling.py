"""A scaling model of raymodule's data-parallel training step, fitted on this machine, checked
against measured runs, and its predictions for larger clusters.

The model of one step of W workers on K nodes (W/K workers a node), global batch G, a gradient
of B bytes:

    step(W, K)  = s(W) * (T(G/W) + o1 + og(x) [W > 1])  +  x
    x           = s(W) node(W/K, B) + net(K, B) + w [W/K > cores]

    T(b)        = c0 + c1 * b        forward, backward and SGD-momentum update of b samples on
                                     one MXNet context (native, one thread), the update a
                                     parameter at a time, as raymodule's workers run it
                                     (raymodule.worker.native.apply_update)
    o1                               raymodule's own cost of a step on one worker (its slice of
                                     the data, the call, the metric): the 1-worker run - T(G)
    og(x)       = g0 + g1 * x        the cost of a step in a group beyond the sums themselves:
                                     the calls' latency and the barriers (g0), and peers late
                                     at the sums (g1 * x): a rank that this machine's other
                                     processes held off its core keeps the others waiting,
                                     the longer the sums take the more. Fitted to the 2-worker
                                     runs on one node (shared memory, x small) and on two (gloo)
    node(n, B)  = 2 a_s m(B) + b_s * B * (c + (n + 1) / n)
                                     the shared-memory sum of a node's n ranks: two barriers a
                                     bucket, a copy in, the sum of 1/n of each bucket over n
                                     slots, and (c = 2) a copy out; c = 1 when the gradient is
                                     one bucket: SGD reads the sum where it was summed
                                     (Collective.reduce_shared). 0 for n = 1
    net(K, B)   = 2 (K - 1) a_g m(B)  +  2 (K - 1) / K * B * b_g
                                     the ring allreduce of the nodes' sums over gloo, one
                                     leader a node, a ring a bucket (0 for K = 1)
    m(B)                             the workers' buckets of a gradient of B bytes
                                     (RAYMODULE_ALLREDUCE_BUCKET_BYTES, 4 MiB by default)
    s(W)        = max(1, W / cores)  the workers share this one machine's cores (every
                                     simulated node runs on them), in their sums as in their
                                     compute
    w                                a sum's extra time when a node's ranks outnumber the
                                     machine's cores: at each barrier of the shared-memory sum
                                     a rank waits for peers the kernel has not run yet. Fitted
                                     to the sum of 4 ranks on one node timed alone, less
                                     s(4) node(4, B); 0 in the predictions, whose workers have
                                     a core each

a_s, b_s are fitted (least squares on the relative error) to shared-memory sums of 2 ranks on
one node (one bucket, read where summed), a_g, b_g to gloo allreduces of 2 ranks on two
nodes, at sizes from 64 KB to 32 MB; c0, c1 to native steps of 16 to 128 samples (ResNet-50: 1
and 2). Every sum goes through raymodule's own Collective (the gradient group its workers
form), on a ray.cluster_utils.Cluster on 127.0.0.1, which also times each tier
(Collective.tier_s).

The check: raymodule.Module.fit of jobs/benchmark.py's mlp (global batch 128) on 1, 2 and 4
workers on 1 and 2 simulated nodes (a Cluster whose nodes hold W/K CPUs each): measured
samples/s (the median of --repeats runs of each layout: rates on a small shared machine move
by 10 % and more between runs) against the model's G / step(W, K). Three layouts calibrate o1
and og (1 on 1; 2 on 1 and 2 on 2); the other two (4 on 1, 4 on 2) are predictions. Beside
each, the CPU each of its workers, the client and the controller used (cores, from /proc, from
40 % to 90 % of the run, when it trains): what a worker does not use, it waits. The sums are
timed with their ranks pinned as the workers of fit pin (raymodule.worker.cores).

The prediction: efficiency at 8, 64 and 512 workers, weak scaling (each worker keeps its batch
b), for the mlp (b 64), LeNet (b 32) and a ResNet-50-sized gradient (25.6M float32, b 32,
compute measured on this CPU with MXNet's model-zoo ResNet-50 v1):

    efficiency(W) = (T(b) + o1) / (T(b) + o1 + og(x) + x),   x = node(n, B) + net(W / n, B)

with n = --workers-per-node workers on every node, each on its own core, and links of 10 and
25 Gb/s between the nodes: b_g there is the slower of this machine's gloo (loopback) and
8 / (the link's bits per second). a_g is loopback's: a real network's latency is higher, which
at 512 workers (2 (K - 1) latencies a step) matters; og(x) is this machine's, kept as
measured: on nodes whose workers have cores of their own, peers are late less often.

Run locally (about 9 minutes; starts and stops its own clusters on 127.0.0.1):

    python jobs/benchmark.py --scaling
    python jobs/scaling.py --json /tmp/scaling.json
    python jobs/scaling.py --from-json /tmp/scaling.json --workers-per-node 4
    python jobs/scaling.py --sample-ms resnet50=3   # a GPU's compute a sample, say

Run under Ray Jobs (it measures the node its driver runs on, with clusters of its own on that
node's 127.0.0.1, not the cluster's other nodes):

    ray job submit --working-dir . -- python jobs/scaling.py
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# one thread per MXNet process, set before anything imports mxnet: this process, its
# children and the clusters it starts (their workers inherit it)
os.environ.update(OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark  # noqa: E402 - jobs/ is not a package: its children (a timed fit)
import jobtools  # noqa: E402
import meters  # noqa: E402
import numpy as np  # noqa: E402
import workload  # noqa: E402 - its models

from raymodule.constants import Settings  # noqa: E402

SIZES = [1 << 16, 1 << 18, 1 << 20, 1 << 22, 3 << 21, 1 << 23, 1 << 24, 1 << 25]  # bytes
LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]  # (workers, nodes) of the check
COMPUTE_BATCHES = [16, 32, 64, 128]  # per-worker batches timed for T(b)
PREDICT_WORKERS = [8, 64, 512]
LINKS_GBPS = [10, 25]
RESNET50_ELEMENTS = 25_557_032  # parameters of ResNet-50 v1 (float32): 102 MB
WEAK_BATCH = {"mlp": 64, "lenet": 32, "resnet50": 32}  # per-worker batch of the prediction
CHECK_MODEL = "mlp"
TIMED_BUCKET_BYTES = 64 << 20  # the sums timed: every size one bucket
SETTINGS = Settings.from_env()  # the workers' buckets and pinning
W_LAYOUT = (4, 1)  # (workers, nodes): the check's sum whose ranks outnumber 2 cores, for w
FORMAT = 2  # of --json's measurements: 2 since the sums are timed as the workers sum
MARK = "SCALING_RESULT "


# ----------------------------------------------------------------------------- children
def compute_child(model: str, batch: int, steps: int) -> None:
    """Prints seconds per forward + backward + SGD-momentum update of ``batch`` samples of
    ``model`` on one MXNet context (one thread), the median of ``steps`` after 3 untimed."""
    import mxnet as mx

    from raymodule.worker import native

    if model == "resnet50":
        net = mx.gluon.model_zoo.vision.resnet50_v1(classes=1000)
        sym = mx.sym.SoftmaxOutput(net(mx.sym.var("data")), name="softmax")
        shape, classes = (3, 224, 224), 1000
    else:
        sym, shape, classes = workload.build_symbol(mx, model), workload.SHAPES[model], 10
    mod = mx.mod.Module(sym, context=mx.cpu())
    mod.bind([("data", (batch,) + shape)], [("softmax_label", (batch,))])
    mod.init_params(mx.init.Xavier())
    mod.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.01, "momentum": 0.9})
    native.update_per_parameter(mod)  # the update's kernels as raymodule's workers run them
    rng = np.random.RandomState(0)
    data = mx.io.DataBatch(
        [mx.nd.array(rng.uniform(-1, 1, (batch,) + shape))],
        [mx.nd.array(rng.randint(0, classes, batch))],
    )
    seconds = []
    for step in range(steps + 3):
        tic = time.perf_counter()
        mod.forward_backward(data)
        native.apply_update(mod, native.gradient_arrays(mod)[0])
        mx.nd.waitall()
        if step >= 3:
            seconds.append(time.perf_counter() - tic)
    print(MARK + json.dumps(statistics.median(seconds)), flush=True)


def run_child(argv: list[str], env: dict | None = None, timeout: float = 900) -> object:
    """Runs this file as a child with ``argv``; returns the value it printed after MARK."""
    proc = subprocess.run(
        [sys.executable, __file__, *argv],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK) and proc.returncode == 0:
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"{argv}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")


# ----------------------------------------------------------------------------- clusters
class _Cluster:
    """A ray.cluster_utils.Cluster on 127.0.0.1: a head without CPUs and ``nodes`` nodes of
    ``cpus`` CPUs each, in a temporary folder; stopped (by its own shutdown) on exit."""

    def __init__(self, nodes: int, cpus: int):
        from ray.cluster_utils import Cluster

        self.tmp = tempfile.mkdtemp(prefix="rscale-", dir="/tmp")
        os.environ["RAY_TMPDIR"] = self.tmp  # short: Ray's socket paths fit in 107 bytes
        os.makedirs(os.path.join(self.tmp, "ray"))
        self.cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
        )
        try:
            self.nodes = [self.cluster.add_node(num_cpus=cpus) for _ in range(nodes)]
            self.cluster.wait_for_nodes()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tier_sums(cluster: _Cluster, layout: tuple[int, int], sizes: list[int], calls: int) -> dict:
    """Median seconds of raymodule's Collective summing a float32 gradient of each size among
    ``layout``'s ranks (workers, nodes), with each tier's median (Collective.tier_s of the
    slowest rank)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raymodule.worker.collective import Collective, free_address
    from raymodule.worker.cores import Pinning

    @ray.remote(num_cpus=0)
    class Member:
        def address(self) -> str:
            return free_address()

        def join(self, world: int, rank: int, address: str) -> None:
            # on a core of its own where the workers of fit would be (every rank is on this
            # machine): raymodule.worker.cores
            Pinning(bool(SETTINGS.pin_cores)).pin(rank, world)
            self.collective = Collective(world, rank, address, "gloo", 120)

        def run(self, nbytes: int, calls: int) -> list[tuple[float, dict]]:
            import mxnet as mx

            grad = mx.nd.ones(nbytes // 4)
            out = []
            for call in range(calls + 5):
                grad.wait_to_read()
                before = dict(self.collective.tier_s)
                tic = time.perf_counter()
                # as a worker's update sums plain SGD's gradients (ModuleWorker.update)
                if self.collective.shares_sums([grad], TIMED_BUCKET_BYTES):
                    self.collective.reduce_shared([grad])
                else:
                    self.collective.reduce([grad], TIMED_BUCKET_BYTES)
                grad.wait_to_read()
                took = time.perf_counter() - tic
                if call >= 5:
                    tiers = {k: v - before[k] for k, v in self.collective.tier_s.items()}
                    out.append((took, tiers))
            return out

        def close(self) -> None:
            self.collective.close()

    workers, nodes = layout
    members = [
        Member.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                cluster.nodes[i % nodes].node_id, soft=False
            )
        ).remote()
        for i in range(workers)
    ]
    try:
        address = ray.get(members[0].address.remote(), timeout=120)
        ray.get([m.join.remote(workers, r, address) for r, m in enumerate(members)], timeout=120)
        result = {}
        for nbytes in sizes:
            runs = ray.get([m.run.remote(nbytes, calls) for m in members], timeout=600)
            took = [max(r[i][0] for r in runs) for i in range(calls)]
            tiers = {
                tier: statistics.median(max(r[i][1][tier] for r in runs) for i in range(calls))
                for tier in runs[0][0][1]
            }
            result[nbytes] = {"s": statistics.median(took), "tiers": tiers}
        ray.get([m.close.remote() for m in members], timeout=60)
        return result
    finally:
        for m in members:
            ray.kill(m)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Intercept and slope of ys over xs, least squares on the relative error (each point
    weighs as much as the others, small ones too)."""
    ys = np.asarray(ys, float)
    slope, intercept = np.polyfit(np.asarray(xs, float), ys, 1, w=1 / ys)
    return float(intercept), float(slope)


def _mx():
    import mxnet as mx

    return mx


@functools.cache
def gradient_bytes() -> dict[str, int]:
    """Bytes of each model's float32 gradient (the symbols' shapes inferred once)."""
    mx = _mx()
    return {
        "mlp": workload.gradient_size(mx, "mlp") * 4,
        "lenet": workload.gradient_size(mx, "lenet") * 4,
        "resnet50": RESNET50_ELEMENTS * 4,
    }


# ----------------------------------------------------------------------------- measuring
def _cpu_by_process() -> dict[int, tuple[float, str]]:
    """CPU seconds (meters.cpu_seconds) and command line of every process of this machine
    (Linux /proc)."""
    out = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        cpu = meters.cpu_seconds(pid)
        if cpu is not None:
            out[pid] = (cpu, command)
    return out


def fit_rate(args, cluster: _Cluster, workers: int) -> dict:
    """samples/s of jobs/benchmark.py's timed fit of the check model on raymodule with
    ``workers`` workers of ``cluster``, and the cores its workers used (each), the client
    and the controller used from 40 % to 90 % of the run (training, not Ray's start)."""
    spec = {"config": "ray1", "workers": workers, "model": CHECK_MODEL}
    spec.update(warmup=50, batches=args.batches)
    env = {"RAY_ADDRESS": cluster.cluster.address, "RAY_TMPDIR": cluster.tmp}
    proc = benchmark.spawn(spec, env)
    samples = []  # (time, CPU by process), every half second
    try:
        deadline = time.monotonic() + args.timeout
        while proc.poll() is None and time.monotonic() < deadline:
            samples.append((time.monotonic(), _cpu_by_process()))
            time.sleep(0.5)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        result = benchmark.result_of(proc)
    finally:
        benchmark.stop([proc])
    # the run ends training: Ray's start and the workers' set-up come first
    (t0, first), (t1, last) = samples[len(samples) * 2 // 5], samples[len(samples) * 9 // 10]
    used = {"worker": 0.0, "client": 0.0, "controller": 0.0}
    for pid, (cpu, command) in last.items():
        kind = (
            "worker"
            if command.startswith("ray::ModuleWorker")
            else "controller"
            if command.startswith("ray::Controller")
            else "client"
            if pid == proc.pid
            else None
        )
        if kind is not None and pid in first:
            used[kind] += (cpu - first[pid][0]) / (t1 - t0)
    used["worker"] /= workers
    return {"samples_per_s": result["samples"] / result["elapsed"], "cores": used}


def measure(args) -> dict:
    """Every measurement the model needs and checks, as plain data (--json writes it)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # under `ray job submit`: clusters of its own here
    out: dict = {"format": FORMAT, "cores": len(os.sched_getaffinity(0))}
    print("timing compute (native MXNet, one thread) ...", file=sys.stderr, flush=True)
    out["compute_s"] = {
        model: {
            b: run_child(["_compute", model, str(b), "30" if model != "resnet50" else "3"])
            for b in (COMPUTE_BATCHES if model != "resnet50" else [1, 2])
        }
        for model in ("mlp", "lenet", "resnet50")
    }
    print("summing gradients: shared memory and gloo ...", file=sys.stderr, flush=True)
    with _Cluster(2, 2) as cluster:
        ray.init(address=cluster.cluster.address, log_to_driver=False)
        try:
            out["shm"] = tier_sums(cluster, (2, 1), SIZES, args.calls)
            out["gloo"] = tier_sums(cluster, (2, 2), SIZES, args.calls)
            nbytes = gradient_bytes()[CHECK_MODEL]
            out["tiers"] = {
                f"{w}x{k}": tier_sums(cluster, (w, k), [nbytes], args.calls)[nbytes]
                for w, k in LAYOUTS
                if w > 1
            }
        finally:
            ray.shutdown()
    out["runs"] = {}
    for workers, nodes in LAYOUTS:
        print(f"fit on {workers} workers, {nodes} nodes ...", file=sys.stderr, flush=True)
        with _Cluster(nodes, workers // nodes) as cluster:
            runs = sorted(
                (fit_rate(args, cluster, workers) for _ in range(args.repeats)),
                key=lambda run: run["samples_per_s"],
            )
        # the median run, and every run's rate: this machine's rates move between runs
        each = [run["samples_per_s"] for run in runs]
        out["runs"][f"{workers}x{nodes}"] = dict(runs[(len(runs) - 1) // 2], each=each)
    return out


# ----------------------------------------------------------------------------- the model
def buckets(nbytes: float) -> int:
    """The workers' buckets of a gradient of ``nbytes``: one sum, with its fixed costs, each."""
    return max(1, math.ceil(nbytes / SETTINGS.allreduce_bucket_bytes))


class Model:
    """The fitted model: the module docstring defines its terms."""

    def __init__(self, m: dict):
        """Fitted to :func:`measure`'s data ``m``."""
        why = self.refusal(m)
        if why:
            raise ValueError(why)
        self.cores = m["cores"]
        shm, gloo = ({int(n): r["s"] for n, r in m[tier].items()} for tier in ("shm", "gloo"))
        sizes = sorted(shm)
        a, self.b_s = fit_line([n * 2.5 for n in sizes], [shm[n] for n in sizes])
        self.a_s = a / 2  # node(2, B) = 2 a_s + b_s * B * 2.5: one bucket, read in place
        a, self.b_g = fit_line(sizes, [gloo[n] for n in sizes])
        self.a_g = a / 2  # net(2, B) = 2 a_g + B * b_g
        self.compute = {  # model -> (c0, c1)
            model: fit_line([int(b) for b in times], list(times.values()))
            for model, times in m["compute_s"].items()
        }
        self.o1 = self.g0 = self.g1 = self.w = 0.0  # each fitted in turn to the model without it
        workers, nodes = W_LAYOUT
        if workers // nodes > self.cores:  # their sum, timed alone, against the model's
            alone = m["tiers"][f"{workers}x{nodes}"]["s"]
            self.w = max(0.0, alone - self.exchange(CHECK_MODEL, workers, nodes))
        self.o1 = self._measured_step(m, 1, 1) - self.step(CHECK_MODEL, 1, 1)
        # og(x) at the two 2-worker runs: what their steps take beyond the model without og
        (x1, r1), (x2, r2) = (
            (
                self.exchange(CHECK_MODEL, 2, k),
                (self._measured_step(m, 2, k) - self.step(CHECK_MODEL, 2, k)) / self.share(2),
            )
            for k in (1, 2)
        )
        self.g1 = (r2 - r1) / (x2 - x1)
        self.g0 = r1 - self.g1 * x1

    @staticmethod
    def refusal(m: dict) -> str | None:
        """Why measurements ``m`` cannot be fitted (of another format), or None."""
        if m.get("format") == FORMAT:
            return None
        return (
            f"measurements of format {m.get('format', 1)}, not {FORMAT}: before format 2 "
            "(2026-12-05) the sums were timed with a copy out and the compute with MXNet's "
            "grouped update, which this model does not describe; measure again"
        )

    @staticmethod
    def _measured_step(m: dict, workers: int, nodes: int) -> float:
        return workload.MODELS[CHECK_MODEL] / m["runs"][f"{workers}x{nodes}"]["samples_per_s"]

    def compute_s(self, model: str, batch: float) -> float:
        c0, c1 = self.compute[model]
        return c0 + c1 * batch

    def node(self, n: int, nbytes: float) -> float:
        if n <= 1:
            return 0.0
        # a copy in, and out unless the one bucket's sum is read where it was summed
        copies = 1 if buckets(nbytes) == 1 else 2
        return 2 * self.a_s * buckets(nbytes) + self.b_s * nbytes * (copies + (n + 1) / n)

    def net(self, k: int, nbytes: float, b_g: float | None = None) -> float:
        if k <= 1:
            return 0.0
        latency = 2 * (k - 1) * self.a_g * buckets(nbytes)
        return latency + 2 * (k - 1) / k * nbytes * (b_g or self.b_g)

    def og(self, exchange: float) -> float:
        """A group's cost of a step beyond its sums, which take ``exchange`` seconds."""
        return self.g0 + self.g1 * exchange

    def share(self, workers: int) -> float:
        """s(W): the workers of every simulated node share this machine's cores."""
        return max(1.0, workers / self.cores)

    def exchange(self, model: str, workers: int, nodes: int) -> float:
        """Seconds of the sums of a step of the check's kind: this machine's cores shared."""
        nbytes = gradient_bytes()[model]
        waits = self.w if workers // nodes > self.cores else 0.0
        return (
            self.share(workers) * self.node(workers // nodes, nbytes)
            + self.net(nodes, nbytes)
            + waits
        )

    def step(self, model: str, workers: int, nodes: int) -> float:
        """Seconds of a step of the check's kind: this machine's cores shared."""
        exchange = self.exchange(model, workers, nodes)
        own = self.compute_s(model, workload.MODELS[model] / workers) + self.o1
        own += self.og(exchange) if workers > 1 else 0.0
        return self.share(workers) * own + exchange

    def efficiency(self, model: str, batch: int, workers: int, per_node: int, gbps: float):
        """Weak scaling on nodes of ``per_node`` workers with a core each, ``gbps`` links."""
        nbytes = gradient_bytes()[model]
        alone = self.compute_s(model, batch) + self.o1
        n = min(per_node, workers)
        b_g = max(self.b_g, 8 / (gbps * 1e9))
        exchange = self.node(n, nbytes) + self.net(workers // n, nbytes, b_g)
        return alone / (alone + self.og(exchange) + exchange)


# ----------------------------------------------------------------------------- the report
def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header] + rows
    )


def report(m: dict, per_node: int, sample_ms: dict) -> str:
    model = Model(m)
    for name, ms in sample_ms.items():  # --sample-ms: compute given, not measured
        model.compute[name] = (0.0, ms / 1e3)
    nbytes = gradient_bytes()
    ms = 1e3
    lines = [
        f"fitted on this machine ({m['cores']} cores):",
        f"  shared memory  a_s {model.a_s * 1e6:6.1f} us  b_s {model.b_s * 1e9:.3f} ns/B "
        f"({1 / model.b_s / 1e9:.1f} GB/s)",
        f"  gloo           a_g {model.a_g * 1e6:6.1f} us  b_g {model.b_g * 1e9:.3f} ns/B "
        f"({1 / model.b_g / 1e9:.2f} GB/s, {8 / model.b_g / 1e9:.1f} Gb/s)",
        f"  o1 {model.o1 * ms:.2f} ms (raymodule's own cost a step, 1 worker), og(x) "
        f"{model.g0 * ms:.2f} ms + {model.g1:.2f} x (a step in a group beyond its sums, "
        "which take x)",
        f"  w {model.w * ms:.2f} ms (a sum's extra wait, a node's ranks outnumbering the cores)",
    ]
    for name, (c0, c1) in model.compute.items():
        lines.append(f"  compute {name:<9} T(b) = {c0 * ms:.2f} ms + {c1 * ms:.4f} ms * b")
    rows = []
    for layout, result in m["tiers"].items():
        w, k = (int(x) for x in layout.split("x"))
        predicted = model.exchange(CHECK_MODEL, w, k)
        rows.append(
            [
                f"{w} on {k}",
                f"{result['s'] * ms:.2f}",
                f"{result['tiers']['shared memory'] * ms:.2f}",
                f"{result['tiers']['gloo'] * ms:.2f}",
                f"{predicted * ms:.2f}",
            ]
        )
    lines += [
        "",
        f"one sum of the {CHECK_MODEL}'s gradient ({nbytes[CHECK_MODEL] / 1e6:.2f} MB), ms "
        "(medians; by tier, the slowest rank's):",
        table(["workers", "measured", "shared memory", "gloo", "model"], rows),
    ]
    rows = []
    for workers, nodes in LAYOUTS:
        run = m["runs"][f"{workers}x{nodes}"]
        measured = run["samples_per_s"]
        each = run.get("each", [measured])  # measurements saved before --repeats: one run
        predicted = workload.MODELS[CHECK_MODEL] / model.step(CHECK_MODEL, workers, nodes)
        role = {(1, 1): "fits o1", (2, 1): "fits og", (2, 2): "fits og"}.get(
            (workers, nodes), "predicted"
        )
        rows.append(
            [
                f"{workers} on {nodes}",
                f"{measured:,.0f}",
                "-".join(f"{rate:,.0f}" for rate in (min(each), max(each))),
                f"{predicted:,.0f}",
                f"{(predicted - measured) / measured:+.0%}",
                role,
                f"{run['cores']['worker']:.2f}",
                f"{run['cores']['client']:.2f}",
                f"{run['cores']['controller']:.2f}",
            ]
        )
    lines += [
        "",
        f"check: {CHECK_MODEL}, global batch {workload.MODELS[CHECK_MODEL]}, raymodule fit, "
        "samples/s (the median run, and the range of the runs), and the cores each worker, "
        "the client and the controller used in the median run:",
        table(
            [
                *("workers", "measured", "runs", "model", "error", ""),
                *("worker", "client", "controller"),
            ],
            rows,
        ),
    ]
    rows = []
    for name, batch in WEAK_BATCH.items():
        step = model.compute_s(name, batch) + model.o1
        for gbps in LINKS_GBPS:
            rows.append(
                [name, f"{nbytes[name] / 1e6:.1f}", f"{batch}", f"{step * ms:.1f}", f"{gbps}"]
                + [
                    f"{model.efficiency(name, batch, w, per_node, gbps):.2f}"
                    for w in PREDICT_WORKERS
                ]
            )
    lines += [
        "",
        f"predicted efficiency, weak scaling: {per_node} workers a node, each on a core of "
        "its own; the nodes' links:",
        table(
            ["model", "MB", "batch", "step ms", "Gb/s"] + [f"{w} workers" for w in PREDICT_WORKERS],
            rows,
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=jobtools.HelpFormatter
    )
    parser.add_argument("--calls", type=int, default=30, help="sums timed per size and layout")
    parser.add_argument("--batches", type=int, default=2000, help="timed batches of each fit")
    parser.add_argument(
        "--repeats", type=int, default=3, help="fits of each layout; the model takes the median"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds for one fit")
    parser.add_argument(
        "--workers-per-node", type=int, default=8, help="workers on each node, predicted"
    )
    parser.add_argument(
        "--sample-ms",
        action="append",
        metavar="MODEL=MS",
        help="predict with MS ms of compute a sample for MODEL (mlp, lenet, resnet50) instead "
        "of this CPU's (a GPU's, say); repeatable",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the measurements there")
    parser.add_argument("--from-json", metavar="PATH", help="report on measurements saved")
    args = parser.parse_args(argv)
    sample_ms = {}
    for item in args.sample_ms or []:
        name, _, value = item.partition("=")
        try:
            sample_ms[name] = float(value)
        except ValueError:
            parser.error(f"--sample-ms {item!r}: not MODEL=MS")
        if name not in WEAK_BATCH or sample_ms[name] <= 0:
            parser.error(f"--sample-ms {item!r}: MODEL is one of {list(WEAK_BATCH)}, MS > 0")
    if args.calls < 1 or args.batches < 50 or args.repeats < 1 or args.workers_per_node < 1:
        parser.error("--calls >= 1, --batches >= 50, --repeats >= 1 and --workers-per-node >= 1")
    if args.from_json:
        m = json.loads(Path(args.from_json).read_text())
        why = Model.refusal(m)
        if why:
            parser.error(f"--from-json {args.from_json}: {why}")
    else:
        m = measure(args)
        if args.json:
            Path(args.json).write_text(json.dumps(m, indent=2) + "\n")
    print(report(m, args.workers_per_node, sample_ms))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_compute"]:
        compute_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        jobtools.run_job(main)
