"""Sweep the learning rate and momentum of the digits MLP (jobs/train.py) with Ray Tune, every
trial training on raymodule workers.

Each trial trains jobs/train.py's MLP on scikit-learn's handwritten digits with its own SGD
learning rate and momentum, on ``--workers`` workers that it reserves up front (with its own
process, in one placement group), and reports the training and validation accuracy at every
epoch's end with a checkpoint. ASHA (the default) stops trials that fall behind at each rung;
``--scheduler pbt`` runs Population Based Training instead: a trial that falls behind copies a
better trial's checkpoint (parameters and optimizer state) and goes on from it with perturbed
hyperparameters. At the end the job prints every trial and the best config with its metric.

The sweep lives in ``--storage``/``--name``: Tune's results and checkpoints, and each trial's
raymodule run under ``raymodule_runs/<trial id>`` (``raymodule runs`` lists them). Started
again with the same name, an unfinished sweep resumes.

Run locally (raymodule starts a Ray on 127.0.0.1 with this machine's CPUs; a 2-CPU machine runs
one 2-worker trial at a time):

    python jobs/sweep.py
    python jobs/sweep.py --samples 8 --scheduler pbt --epochs 10 --name digits-pbt

Run on a Ray cluster (from the repository root; the job joins the cluster through RAY_ADDRESS),
with the sweep in object storage so that a resubmitted job resumes it:

    ray job submit --working-dir . -- python jobs/sweep.py --samples 16 --workers 4 \
        --name digits-sweep --storage 's3://my-bucket/sweeps?region=us-east-1'
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import mxnet as mx
import ray
import train as train_job  # jobs/train.py: the model and the data
from jobtools import (
    HelpFormatter,
    add_training_options,
    check_storage,
    check_training_options,
    run_job,
)
from train import digits, mlp

import raymodule
import raymodule.runtime
from raymodule.storage import credentials_in, is_uri, redact

METRIC = "validation-accuracy"

# Trials unpickle train_trial in their own processes, where jobs/ may not be importable (a
# `ray job submit --working-dir .` job has the repository as its working directory): the
# functions it uses from jobs/train.py travel with it.
ray.cloudpickle.register_pickle_by_value(train_job)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sweep the SGD learning rate and momentum of the digits MLP of "
        "jobs/train.py with Ray Tune; each trial trains on its own raymodule workers.",
        formatter_class=HelpFormatter,
    )
    add_training_options(parser, epochs=6, batch_size=64)
    for action in parser._actions:
        if action.dest == "workers":
            action.help = "raymodule workers of each trial"
    parser.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves"
    )
    parser.add_argument(
        "--trial-cpus",
        type=float,
        default=0.0,
        help="CPUs each trial reserves for its own process, which reads the data and runs the "
        "callbacks (0: it shares its first worker's CPU, as the client of a plain run does)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=4,
        help="trials: configs drawn from the search space (with pbt: the population size)",
    )
    parser.add_argument(
        "--scheduler",
        choices=("asha", "pbt"),
        default="asha",
        help="asha: stop trials that fall behind at each rung of epochs (1, 2, 4, ...); pbt: "
        "Population Based Training, where a trial in the worst quarter (half, for fewer than "
        "4 trials) continues from a trial of the best quarter's checkpoint with perturbed "
        "hyperparameters",
    )
    parser.add_argument(
        "--perturbation-interval",
        type=int,
        default=1,
        help="with pbt: epochs between a trial's exploit/explore steps",
    )
    parser.add_argument(
        "--lr", nargs=2, type=float, default=(0.005, 0.5), metavar=("MIN", "MAX"),
        help="learning-rate range, sampled log-uniformly",
    )  # fmt: skip
    parser.add_argument(
        "--momentum", nargs=2, type=float, default=(0.0, 0.95), metavar=("MIN", "MAX"),
        help="momentum range, sampled uniformly",
    )  # fmt: skip
    parser.add_argument(
        "--seed",
        type=int,
        default=42,
        help="seed of the data split, the initial parameters (the same in every trial) and "
        "the configs drawn",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        help="trials running at once (0: as many as the cluster holds)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="sweep name; a sweep started again with the same name resumes its unfinished "
        "trials (default: a new name, printed)",
    )
    parser.add_argument(
        "--storage",
        default="./raymodule_sweeps",
        help="where sweeps are kept: a local path or a URI such as "
        "'s3://bucket/sweeps?endpoint_override=127.0.0.1:9000&scheme=http' (keys from the "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables, which the trials' processes "
        "need too; never in the URI, which Tune records)",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="Tune's progress output: 0 none, 1 a status table now and then, 2 every result",
    )
    args = parser.parse_args(argv)
    check_training_options(parser, args)
    if args.samples < 1:
        parser.error(f"--samples={args.samples}: need at least 1")
    if args.cpus_per_worker <= 0 or args.trial_cpus < 0:
        parser.error(
            f"--cpus-per-worker={args.cpus_per_worker:g} must be > 0 and "
            f"--trial-cpus={args.trial_cpus:g} >= 0"
        )
    if args.perturbation_interval < 1:
        parser.error(f"--perturbation-interval={args.perturbation_interval}: need at least 1")
    if not 0 < args.lr[0] <= args.lr[1]:
        parser.error(f"--lr {args.lr[0]:g} {args.lr[1]:g}: need 0 < MIN <= MAX")
    if not 0 <= args.momentum[0] <= args.momentum[1] < 1:
        parser.error(
            f"--momentum {args.momentum[0]:g} {args.momentum[1]:g}: need 0 <= MIN <= MAX < 1"
        )
    if args.max_concurrent < 0:
        parser.error(f"--max-concurrent={args.max_concurrent}: need 0 or more")
    if args.name is None:
        args.name = time.strftime("sweep-%Y%m%d-%H%M%S")
    try:  # a sweep name is a folder name, as a run name is
        args.location = raymodule.RunConfig(name=args.name, storage=args.storage)
    except ValueError as err:
        parser.error(str(err).replace("RunConfig(", "("))
    held = credentials_in(args.storage)
    if held:  # Tune keeps its storage path in the experiment's state and the job's metadata
        parser.error(
            f"--storage {redact(args.storage)!r} holds credentials ({', '.join(held)}), which "
            "Ray Tune would record with the sweep; give the keys in AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (on every node) instead"
        )
    return args


def train_trial(config: dict) -> None:
    """One trial: jobs/train.py's MLP with the trial's learning rate and momentum, on the
    workers the trial reserved, reporting every epoch to Tune with a checkpoint."""
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # per report
    train, test = digits(config["seed"], config["batch_size"])
    mx.random.seed(config["seed"])
    report = raymodule.tune.report_callback()
    with raymodule.Module(mlp(), context=raymodule.tune.workers()) as mod:
        mod.fit(
            train,
            eval_data=test,
            eval_metric="acc",
            optimizer="sgd",
            optimizer_params={
                "learning_rate": config["lr"],
                "momentum": config["momentum"],
                "wd": 1e-4,
            },
            initializer=mx.init.Xavier(),
            num_epoch=config["epochs"],
            batch_end_callback=report,
            eval_end_callback=report,
            run=raymodule.tune.run_config(),
        )


def make_tuner(args, trainable):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space = {
        "lr": tune.loguniform(*args.lr),
        "momentum": tune.uniform(*args.momentum),
    }
    param_space = {
        **space,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
    }
    experiment = args.location.location
    if tune.Tuner.can_restore(experiment):
        print(f"resuming the sweep at {redact(experiment)}", flush=True)
        return tune.Tuner.restore(
            experiment, trainable, resume_errored=True, param_space=param_space
        )
    if args.scheduler == "asha":
        scheduler = ASHAScheduler(max_t=args.epochs, grace_period=1, reduction_factor=2)
    else:
        scheduler = PopulationBasedTraining(
            time_attr="training_iteration",  # one report per epoch
            perturbation_interval=args.perturbation_interval,
            hyperparam_mutations=space,
            quantile_fraction=0.25 if args.samples >= 4 else 0.5,
        )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            num_samples=args.samples,
            max_concurrent_trials=args.max_concurrent or None,
            search_alg=BasicVariantGenerator(random_state=args.seed),
        ),
        run_config=tune.RunConfig(
            name=args.name,
            storage_path=args.location.storage,
            verbose=args.verbose,
        ),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    check_storage(args.location)  # before Ray starts: a --storage that cannot be written ends here
    raymodule.runtime.ensure_ray()  # RAY_ADDRESS's cluster, or a local Ray on 127.0.0.1
    trainable = raymodule.tune.with_workers(
        train_trial, args.workers, cpus=args.cpus_per_worker, head_cpus=args.trial_cpus
    )
    print(
        f"sweep {args.name!r}: {args.samples} trials ({args.scheduler}) of {args.epochs} epochs, "
        f"each on {args.workers} workers x {args.cpus_per_worker:g} CPU"
        + (f" + {args.trial_cpus:g} CPU for the trial" if args.trial_cpus else "")
        + f"; the cluster has {ray.cluster_resources().get('CPU', 0):g} CPUs",
        flush=True,
    )
    start = time.monotonic()
    try:
        results = make_tuner(args, trainable).fit()
    except Exception as err:  # Tune wraps what a trial-resource request raised
        cause = _raymodule_cause(err)
        if isinstance(cause, raymodule.PlacementError):
            raise raymodule.PlacementError(
                f"{cause} (this job's --workers, --cpus-per-worker and --trial-cpus)"
            ) from None
        if cause is None:
            raise
        raise cause from None
    elapsed = time.monotonic() - start

    print(f"\n{len(results)} trials in {elapsed:.0f} s ({redact(args.location.location)}):")
    for result in sorted(results, key=lambda r: r.metrics.get("trial_id", "")):
        metrics, config = result.metrics, result.config
        status = "error" if result.error else f"{METRIC} {metrics.get(METRIC, float('nan')):.4f}"
        print(
            f"  {metrics.get('trial_id', '?')}: lr={config['lr']:.4g} "
            f"momentum={config['momentum']:.3f}: {status} after {metrics.get('epoch', 0)} epochs"
        )
    if results.errors:
        for error in results.errors:
            print(f"a trial failed: {error}", file=sys.stderr)
        return 1
    best = results.get_best_result()
    print(
        f"best config: lr={best.config['lr']:.4g} momentum={best.config['momentum']:.3f}: "
        f"{METRIC} {best.metrics[METRIC]:.4f} after {best.metrics['epoch']} epochs "
        f"(trial {best.metrics['trial_id']})"
    )
    if best.checkpoint is not None:
        where, epoch = _location(best.checkpoint), best.metrics["epoch"]
        print(f"its checkpoint: {where}")
        if not is_uri(where):
            print(f"(plain MXNet loads it: mx.mod.Module.load('{where}/model', {epoch}))")
    return 0


def _raymodule_cause(err: BaseException | None) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, raymodule.RayModuleError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _location(checkpoint) -> str:
    """A Tune checkpoint's folder as a path or URI (its filesystem's scheme, no options)."""
    kind = type(checkpoint.filesystem).__name__
    scheme = {"S3FileSystem": "s3://", "GcsFileSystem": "gs://"}.get(kind, "")
    path = checkpoint.path
    return path if not scheme or is_uri(path) else scheme + path


if __name__ == "__main__":
    run_job(main)
