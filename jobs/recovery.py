"""Measure elastic recovery: kill one of three workers mid-run and time the way back.

For each trial, an MLP trains on 3 raymodule workers through an elastic run
(``RunConfig(min_workers=2)``); one worker SIGKILLs its own process as it is about to run a
chosen step (``tests/stepfaults.py``: the kill is keyed to the worker's step, so it lands
where the workers are, not where the client's trailing callbacks are). The victim rotates
over the workers that are not rank 0. Reported per trial:

- seconds from the kill to the next completed step (the first step the re-formed group
  finishes, as its ``batch_end_callback`` sees it, so it includes the pipeline's trail);
- the recovery the library logged (failure detected to group re-formed, state in sync);
- steps lost: steps every worker had applied before the kill (the victim fires having
  applied ``--kill-at`` steps, and its peers are in step with it) that were run again; the
  goal is 0;
- how far its parameters end from those of the same run without the kill (relative to each
  parameter's largest value).

With ``--compare-restart`` the same kill is also handled the way a framework without elastic
membership handles it: every worker is killed and the run goes on from its latest checkpoint
(``--checkpoint-every`` batches apart), for comparison.

Run locally (starts a Ray on 127.0.0.1 with 4 logical CPUs, whatever this machine has):

    python jobs/recovery.py --trials 3 --compare-restart

Run on a Ray cluster with room for 3 one-CPU workers:

    ray job submit --working-dir . -- python jobs/recovery.py --trials 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import jobtools  # noqa: E402,F401  (puts the repository on sys.path)
import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402

import raymodule  # noqa: E402
import raymodule.module  # noqa: E402

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)
import stepfaults  # noqa: E402  (tests/: workers that fire faults at their own steps)

WORKERS = 3
OPTIMIZER = {"learning_rate": 0.1, "momentum": 0.9}


def mlp() -> mx.sym.Symbol:
    net = mx.sym.Variable("data")
    for i, width in enumerate((256, 128)):
        net = mx.sym.Activation(
            mx.sym.FullyConnected(net, num_hidden=width, name=f"fc{i}"), act_type="relu"
        )
    return mx.sym.SoftmaxOutput(
        mx.sym.FullyConnected(net, num_hidden=10, name="out"), name="softmax"
    )


def batches(n_batches: int, batch: int) -> mx.io.NDArrayIter:
    """A learnable task: the class is the argmax of a fixed linear map of the input."""
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (n_batches * batch, 64)).astype("float32")
    y = (x @ rng.uniform(-1, 1, (64, 10))).argmax(axis=1).astype("float32")
    return mx.io.NDArrayIter(x, y, batch_size=batch)


def train(args, **fit_args) -> dict:
    """One epoch of the MLP on 3 workers, ``fit_args`` given to ``fit``: its parameters at the
    end."""
    mx.random.seed(0)
    with raymodule.Module(mlp(), context=[mx.cpu(i) for i in range(WORKERS)]) as mod:
        mod.fit(
            batches(args.batches, args.batch_size),
            num_epoch=1,
            optimizer_params=OPTIMIZER,
            **fit_args,
        )
        arg, aux = mod.get_params()
    return {**arg, **aux}


def failure_free(args) -> dict:
    """The same run on the same 3 workers, nobody lost: what a run that loses one must end
    with (to float rounding: after the loss, 2 workers sum the gradients in another order)."""
    return train(args)


class Seen:
    """A ``batch_end_callback`` that notes when (wall clock, as the kill's time is) each
    batch's callback last ran."""

    def __init__(self):
        self.at: dict[int, float] = {}

    def __call__(self, param) -> None:
        self.at[param.nbatch] = time.time()


def trial(args, storage: str, number: int, reference: dict, restart: bool) -> dict:
    """One run with one kill. ``restart``: every worker kills itself at that step, so the run
    goes on from its latest checkpoint (as a framework that restarts the whole group does)
    instead of on the survivors."""
    victim = None if restart else 1 + number % (WORKERS - 1)
    name = f"{'restart' if restart else 'elastic'}-{number}"
    marks = tempfile.mkdtemp(prefix="marks-", dir=storage)
    # the worker fires as it is about to run batch kill_at, having applied kill_at steps
    killers = stepfaults.worker_class({(args.kill_at, victim): "die"}, marks)
    seen = Seen()
    run = raymodule.RunConfig(
        name=name, storage=storage, checkpoint_every=args.checkpoint_every, min_workers=2
    )
    # the module's workers (those a restart starts again too) are killers
    handle = raymodule.module.ControllerHandle
    raymodule.module.ControllerHandle = stepfaults.with_workers(killers)
    try:
        got = train(args, batch_end_callback=seen, run=run)
    finally:
        raymodule.module.ControllerHandle = handle
    fired = [os.path.join(marks, f) for f in os.listdir(marks) if f.startswith("fired-")]
    if not fired:
        raise RuntimeError(f"no worker reached step {args.kill_at}: nothing was killed")
    killed_at = min(os.stat(path).st_mtime for path in fired)  # made just before the kill
    with open(os.path.join(storage, name, "metrics.jsonl")) as f:
        events = [e for e in map(json.loads, f) if e.get("event") == "membership"]
    change = events[0]
    if restart:  # steps in the checkpoint it went on from
        went_on_from = int(change["from_checkpoint"].split("-")[1])
    else:  # steps every survivor had applied
        went_on_from = change["step"]
    # step s is batch s - 1: the first step after the change is batch went_on_from
    diff = max(
        float(
            np.abs(reference[k].asnumpy() - got[k].asnumpy()).max()
            / max(np.abs(reference[k].asnumpy()).max(), 1e-12)
        )
        for k in reference
    )
    return {
        "kill_to_next_step_s": seen.at[went_on_from] - killed_at,
        "recovery_logged_s": change.get("recovery_s"),
        "steps_lost": max(0, args.kill_at - went_on_from),
        "world_size_after": change["world_size"],
        "max_relative_diff": diff,
    }


def summary(label: str, results: list[dict]) -> str:
    seconds = [r["kill_to_next_step_s"] for r in results]
    lost = [r["steps_lost"] for r in results]
    p90 = (
        statistics.quantiles(seconds, n=10, method="inclusive")[-1]
        if len(seconds) > 1
        else seconds[0]
    )
    return (
        f"{label}: kill -> next completed step {statistics.median(seconds):.2f} s median, "
        f"{p90:.2f} s p90, {max(seconds):.2f} s max over {len(seconds)} trials; "
        f"steps lost {statistics.median(lost):g} median "
        f"(max {max(lost)}); largest difference from the failure-free run "
        f"{max(r['max_relative_diff'] for r in results):.1e}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="kills to time, one run each")
    parser.add_argument("--batches", type=int, default=120, help="batches in the run")
    parser.add_argument("--batch-size", type=int, default=96, help="global batch size")
    parser.add_argument(
        "--kill-at", type=int, default=45, help="the step (batch) a worker kills itself before"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=10, help="batches between run checkpoints"
    )
    parser.add_argument(
        "--compare-restart",
        action="store_true",
        help="also time the same kill handled by restarting every worker from the latest "
        "checkpoint (what frameworks without elastic membership do)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if not 0 < args.kill_at < args.batches - 10:
        parser.error(f"--kill-at={args.kill_at} must leave 10 batches after it")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    reference = failure_free(args)
    results = {"elastic": [], "restart": []}
    modes = ["elastic"] + (["restart"] if args.compare_restart else [])
    with tempfile.TemporaryDirectory(prefix="recovery-") as storage:
        for mode in modes:
            for number in range(args.trials):
                result = trial(args, storage, number, reference, restart=mode == "restart")
                results[mode].append(result)
                rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
                print(json.dumps({"mode": mode, "trial": number, **rounded}), flush=True)
    print(f"\nkill at batch {args.kill_at} of {args.batches}, {args.trials} trials each:")
    print(summary(f"elastic (one of {WORKERS} killed, goal <= 5 s and 0 lost)", results["elastic"]))
    if args.compare_restart:
        print(
            summary(
                f"restart from checkpoint (all {WORKERS} killed, checkpoint every "
                f"{args.checkpoint_every} batches)",
                results["restart"],
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
