"""Training throughput: native MXNet vs MXNet dist_sync vs raymodule on 1 and 2 Ray workers.

Measures samples/s of forward + backward + SGD-momentum update (lr 0.01, momentum 0.9,
rescale_grad = 1/global batch) for an MLP 784-512-512-10 (global batch 128) and a LeNet
(global batch 64) on synthetic data, in four configurations:

    native     single-process mx.mod.Module on mx.cpu()
    dist_sync  MXNet's dist_sync KVStore on 127.0.0.1: 1 scheduler, 1 server, 2 workers,
               each worker training on its half of every global batch
    ray1       raymodule.Module(sym, context=[mx.cpu(0)])
    ray2       raymodule.Module(sym, context=[mx.cpu(0), mx.cpu(1)])

Before each model's row it also times a bare 2-process gloo allreduce of that model's gradient
(torch.distributed on 127.0.0.1, nothing else running): the floor of what raymodule x2 pays
per step for its exchange, printed under the table (--no-gloo-floor skips it).

Every configuration runs in its own subprocess with OMP_NUM_THREADS=1 and
MXNET_CPU_WORKER_NTHREADS=1. All use the same method: Module.fit with epochs of --warmup
batches; the first epoch is a warm-up, samples/s is measured over the next --batches batches.

Run locally (ray1/ray2 start their own loopback-only Ray with 4 CPUs):

    python jobs/benchmark.py
    python jobs/benchmark.py --configs native,dist_sync --json /tmp/bench.json

Run on an existing Ray cluster (ray1/ray2 then join it through RAY_ADDRESS):

    ray job submit --working-dir . -- python jobs/benchmark.py
"""

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = {"mlp": 128, "lenet": 64}  # model -> global batch size
DEFAULT_BATCHES = {"mlp": 600, "lenet": 300}  # timed batches: ~5-15 s each on 2 cores
CONFIGS = ["native", "dist_sync", "ray1", "ray2"]
LABELS = ["native", "dist_sync", "raymodule x1", "raymodule x2"]  # table columns of CONFIGS
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1"}
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GLOO_SOCKET_IFNAME": "lo",
}
MARK = "BENCH_RESULT "  # prefix of the one result line a child prints
HELP = {
    "models": "comma-separated models: mlp (784-512-512-10, global batch 128), "
    "lenet (1x28x28, global batch 64). Default: %(default)s",
    "configs": "comma-separated configurations: native, dist_sync, ray1 (raymodule, 1 worker), "
    "ray2 (raymodule, 2 workers); leave out ray1,ray2 to skip raymodule. Default: %(default)s",
    "batches": "timed global batches per configuration, rounded up to a multiple of --warmup "
    f"(default: mlp {DEFAULT_BATCHES['mlp']}, lenet {DEFAULT_BATCHES['lenet']}: ~5-15 s each)",
    "warmup": "untimed warm-up batches; also the epoch length, as time is taken at the end "
    "of each epoch (default: %(default)s)",
    "timeout": "seconds before a configuration's processes are killed (default: %(default)s)",
}


# ----------------------------------------------------------------------------- child side
def build_symbol(mx, model):
    x = mx.sym.Variable("data")
    if model == "mlp":
        for i, width in enumerate([512, 512]):
            x = mx.sym.Activation(
                mx.sym.FullyConnected(x, num_hidden=width, name=f"fc{i}"), act_type="relu"
            )
    else:
        for i, filters in enumerate([20, 50]):
            x = mx.sym.Convolution(x, kernel=(5, 5), num_filter=filters, name=f"conv{i}")
            x = mx.sym.Pooling(
                mx.sym.Activation(x, act_type="tanh"), pool_type="max", kernel=(2, 2), stride=(2, 2)
            )
        x = mx.sym.Activation(
            mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=500, name="fc0"), act_type="tanh"
        )
    x = mx.sym.FullyConnected(x, num_hidden=10, name="out")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def make_iter(mx, model, n_batches, rank=0, parts=1):
    """Synthetic data: n_batches global batches, of which this worker gets part `rank`."""
    batch = MODELS[model]
    shape = (784,) if model == "mlp" else (1, 28, 28)
    rng = np.random.RandomState(0)
    data = rng.uniform(-1, 1, (n_batches, batch) + shape).astype(np.float32)
    label = rng.randint(0, 10, (n_batches, batch)).astype(np.float32)
    part = batch // parts
    rows = slice(rank * part, (rank + 1) * part)
    return mx.io.NDArrayIter(
        data[:, rows].reshape((-1,) + shape),
        label[:, rows].reshape(-1),
        batch_size=part,
        label_name="softmax_label",
    )


def timed_fit(mx, mod, model, spec, kv=None, rank=0, parts=1):
    """fit() one warm-up epoch plus the timed epochs; returns (timed samples, seconds)."""
    epochs = math.ceil(spec["batches"] / spec["warmup"])
    marks = []

    def on_epoch_end(*_):
        if kv is not None:
            kv._barrier()
        marks.append(time.perf_counter())

    # rescale_grad explicit: for dist_sync, Module would otherwise derive it from num_workers
    sgd = {"learning_rate": 0.01, "momentum": 0.9, "rescale_grad": 1.0 / MODELS[model]}
    kvstore = {} if kv is None else {"kvstore": kv}  # else fit's default, "local"
    mod.fit(
        make_iter(mx, model, spec["warmup"], rank, parts),
        num_epoch=1 + epochs,
        optimizer="sgd",
        optimizer_params=sgd,
        initializer=mx.init.Xavier(),
        epoch_end_callback=on_epoch_end,
        **kvstore,
    )
    return epochs * spec["warmup"] * MODELS[model] // parts, marks[-1] - marks[0]


def gloo_floor(mx, model):
    """ms per gloo allreduce of the model's whole gradient between 2 processes: the floor of
    what raymodule x2 pays per step for its exchange (torch.distributed, 127.0.0.1)."""
    import datetime

    import torch
    import torch.distributed as dist

    shape = (MODELS[model], 784) if model == "mlp" else (MODELS[model], 1, 28, 28)
    arg_shapes, _, _ = build_symbol(mx, model).infer_shape(data=shape)
    numel = sum(int(np.prod(s)) for s in arg_shapes[1:-1])  # without data and label
    rank = int(os.environ["GLOO_RANK"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['GLOO_PORT']}",
        world_size=2,
        rank=rank,
        timeout=datetime.timedelta(seconds=60),
    )
    grad = torch.ones(numel)
    for _ in range(10):
        dist.all_reduce(grad)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(100):
        dist.all_reduce(grad)
    elapsed = (time.perf_counter() - start) / 100
    dist.destroy_process_group()
    return numel * 4, elapsed


def child(spec):
    os.environ.update(THREAD_ENV)  # before mxnet is imported
    config, model = spec["config"], spec["model"]
    if config == "dist_sync" and os.environ["DMLC_ROLE"] != "worker":
        import mxnet  # noqa: F401  # scheduler/server: runs ps-lite until the workers finish

        return
    if config in ("ray1", "ray2"):
        os.environ.update(RAY_ENV)  # before ray is imported
    import mxnet as mx

    sym = build_symbol(mx, model)
    if config == "gloo":
        result = gloo_floor(mx, model)
    elif config == "native":
        result = timed_fit(mx, mx.mod.Module(sym, context=mx.cpu()), model, spec)
    elif config == "dist_sync":
        kv = mx.kv.create("dist_sync")
        mod = mx.mod.Module(sym, context=mx.cpu())
        result = timed_fit(mx, mod, model, spec, kv, kv.rank, kv.num_workers)
    else:
        import ray

        import raymodule

        own_tmp = None if os.environ.get("RAY_ADDRESS") else tempfile.mkdtemp(prefix="rb-")
        try:
            if own_tmp is None:  # under `ray job submit`: join the cluster in RAY_ADDRESS
                ray.init()
            else:  # "local": a new private cluster, never someone else's `ray start` one
                os.environ["RAY_TMPDIR"] = own_tmp
                ray.init(address="local", num_cpus=4, include_dashboard=False)
            ctx = [mx.cpu(i) for i in range(1 if config == "ray1" else 2)]
            result = timed_fit(mx, raymodule.Module(sym, context=ctx), model, spec)
        finally:
            ray.shutdown()
            if own_tmp:
                shutil.rmtree(own_tmp, ignore_errors=True)
    print(MARK + json.dumps({"samples": result[0], "elapsed": result[1]}), flush=True)


# ---------------------------------------------------------------------------- parent side
def spawn(spec, extra_env=None):
    """Start this file as a child in its own process group; output goes to a temp file."""
    out = tempfile.TemporaryFile(mode="w+")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p),
        **(extra_env or {}),
    )
    proc = subprocess.Popen(
        [sys.executable, __file__, "_child", json.dumps(spec)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.out, proc.label = out, (extra_env or {}).get("DMLC_ROLE", spec["config"])
    return proc


def stop(procs, grace=5.0):
    """SIGTERM each child by PID, wait up to `grace` s, then SIGKILL what is left of its
    process group (the group id is the child's PID: it holds e.g. the Ray processes it started)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        proc.out.close()


def result_of(proc):
    """The JSON result line a child printed; raises with the tail of its output if none."""
    proc.out.seek(0)
    text = proc.out.read()
    for line in reversed(text.splitlines()):
        if line.startswith(MARK) and proc.returncode == 0:
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"{proc.label}: exit code {proc.returncode}, output:\n{text[-2000:]}")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(config, model, args):
    """Run one configuration in subprocesses; returns global samples/s."""
    batches = args.batches or DEFAULT_BATCHES[model]
    spec = {"config": config, "model": model, "warmup": args.warmup, "batches": batches}
    procs = []
    try:
        if config == "dist_sync":
            dmlc = {
                "DMLC_PS_ROOT_URI": "127.0.0.1",
                "DMLC_PS_ROOT_PORT": str(free_port()),
                "DMLC_NUM_SERVER": "1",
                "DMLC_NUM_WORKER": "2",
                "DMLC_NODE_HOST": "127.0.0.1",
                "DMLC_INTERFACE": "lo",
            }
            for role in ["scheduler", "server", "worker", "worker"]:
                procs.append(spawn(spec, dict(dmlc, DMLC_ROLE=role)))
            workers = procs[2:]
        elif config == "gloo":
            port = str(free_port())
            for rank in range(2):
                procs.append(
                    spawn(
                        spec,
                        {"GLOO_RANK": str(rank), "GLOO_PORT": port, "GLOO_SOCKET_IFNAME": "lo"},
                    )
                )
            workers = procs
        else:
            procs.append(spawn(spec))
            workers = procs
        deadline = time.monotonic() + args.timeout
        while any(proc.poll() is None for proc in workers):
            for proc in procs:
                if proc.poll():  # crashed: report it now, the others would hang
                    result_of(proc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {args.timeout} s")
            time.sleep(0.2)
        results = [result_of(proc) for proc in workers]
        if config == "gloo":  # (bytes, seconds per allreduce)
            return results[0]["samples"], max(r["elapsed"] for r in results)
        return sum(r["samples"] for r in results) / max(r["elapsed"] for r in results)
    finally:
        stop(procs)


def fmt(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--models", default="mlp,lenet", help=HELP["models"])
    add("--configs", default=",".join(CONFIGS), help=HELP["configs"])
    add("--batches", type=int, default=0, help=HELP["batches"])
    add("--warmup", type=int, default=50, help=HELP["warmup"])
    add("--timeout", type=float, default=300.0, help=HELP["timeout"])
    add("--json", metavar="PATH", help="also write the results as JSON to PATH")
    add(
        "--no-gloo-floor",
        dest="gloo_floor",
        action="store_false",
        help="skip timing a bare 2-process gloo allreduce of each model's gradient",
    )
    args = parser.parse_args(argv)
    models, configs = args.models.split(","), args.configs.split(",")
    for name, allowed in [(models, MODELS), (configs, CONFIGS)]:
        if set(name) - set(allowed):
            parser.error(f"unknown {sorted(set(name) - set(allowed))}; choose from {list(allowed)}")

    results, errors, gloo = {}, {}, {}
    for model in models:
        if args.gloo_floor:
            try:
                gloo[model] = run_config("gloo", model, args)
            except Exception as exc:  # a probe: report it, the table still matters
                print(f"FAILED {model} gloo probe: {exc}", file=sys.stderr, flush=True)
        results[model] = dict.fromkeys(CONFIGS)
        for config in configs:
            print(f"running {model} {config} ...", file=sys.stderr, flush=True)
            try:
                results[model][config] = run_config(config, model, args)
            except Exception as exc:  # report it and go on with the other configurations
                errors[f"{model}/{config}"] = str(exc)
                print(f"FAILED {model} {config}: {exc}", file=sys.stderr, flush=True)
        r = results[model]
        r["x1/native"] = r["ray1"] / r["native"] if r["ray1"] and r["native"] else None
        r["x2/dist_sync"] = r["ray2"] / r["dist_sync"] if r["ray2"] and r["dist_sync"] else None

    header = ["model"] + LABELS + ["x1/native", "x2/dist_sync"]
    rows = [
        [m] + [fmt(r[c]) for c in CONFIGS] + [fmt(r["x1/native"], 2), fmt(r["x2/dist_sync"], 2)]
        for m, r in results.items()
    ]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    print("samples/s (higher is better)")
    for row in [header] + rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    for model in models:
        floor = gloo.get(model)
        if floor:
            size, seconds = floor
            print(
                f"{model}: one gloo allreduce of its {size / 1e6:.1f} MB gradient between 2 "
                f"processes on 127.0.0.1 takes {seconds * 1e3:.2f} ms (torch.distributed, "
                "idle machine): the floor of raymodule x2's exchange per step"
            )
    if args.json:
        batches = {m: args.batches or DEFAULT_BATCHES[m] for m in models}
        report = {
            "samples_per_s": results,
            "gloo_allreduce_s": {m: gloo[m][1] for m in gloo},
            "errors": errors,
            "warmup": args.warmup,
            "batches": batches,
            "global_batch": {m: MODELS[m] for m in models},
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` blocks run
    if sys.argv[1:2] == ["_child"]:
        child(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
