"""Ray Tune sweeps over raymodule training, on the session's real Ray (4 CPUs) and, for the
sweep job, on a real local cluster with a dashboard (its state API shows where every actor
ran) and trials that keep their runs in a real S3 server."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's plain output; verbose=0 below

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from localcluster import local_cluster  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining  # noqa: E402

import raymodule  # noqa: E402
import raymodule.tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Trial processes cannot import this test module: its trial functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- trial functions -----------------------------------------------------------------------
def blobs(n=640, features=16, classes=4, seed=0):
    """Points labelled by a fixed random linear map: learnable in a few epochs."""
    rng = np.random.RandomState(seed)
    w = rng.normal(size=(features, classes))
    x = rng.normal(size=(n, features)).astype("float32")
    return x, (x @ w).argmax(axis=1).astype("float32")


def iterators(batch_size=32):
    x, y = blobs()
    np.random.seed(0)  # the shuffle: a restarted trial makes the same order
    train = mx.io.NDArrayIter(x[:512], y[:512], batch_size=batch_size, shuffle=True)
    return train, mx.io.NDArrayIter(x[512:], y[512:], batch_size=batch_size)


def net(classes=4):
    body = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=32, name="fc0")
    body = mx.sym.Activation(body, act_type="relu", name="relu0")
    body = mx.sym.FullyConnected(body, num_hidden=classes, name="out")
    return mx.sym.SoftmaxOutput(body, name="softmax")


def fit_trial(config, eval_end=(), name=None):
    train, val = iterators()
    mx.random.seed(0)  # every trial starts from the same parameters
    report = raymodule.tune.report_callback()
    with raymodule.Module(net(), context=raymodule.tune.workers()) as mod:
        mod.fit(
            train,
            eval_data=val,
            eval_metric="acc",
            optimizer="sgd",
            optimizer_params={"learning_rate": config["lr"], "momentum": config["momentum"]},
            initializer=mx.init.Xavier(),
            num_epoch=config["epochs"],
            batch_end_callback=report,
            eval_end_callback=[report, *eval_end],
            run=raymodule.tune.run_config(name=name),
        )


def train_asha(config):
    fit_trial(config, name="shared")  # one name for every trial: each still gets its own run


def role(trial_id: str) -> str:
    """The PBT test's trials by their index (their configs are copied on exploits): the
    first learns well, the second (almost) nothing until it exploits the first."""
    return "leader" if trial_id.endswith("_00000") else "follower"


class Processed(tune.Callback):
    """In the driver: per trial, the last epoch whose report Tune has processed (its
    scheduler decided on it), in a file the trials read."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_trial_result(self, iteration, trials, trial, result, **info):
        path = Path(self.folder, role(trial.trial_id))
        done = max(result["epoch"], Lockstep.read(path))
        path.with_suffix(".tmp").write_text(str(done))
        path.with_suffix(".tmp").replace(path)


class Lockstep:
    """Keys the two PBT trials' reports to each other's (never to the clock): the leader
    sends epoch k's report once Tune processed the follower's k - 1, the follower once Tune
    processed the leader's k. PBT then sees the same order of results in every run."""

    def __init__(self, folder: str):
        self.folder = folder
        self.role = role(tune.get_context().get_trial_id())
        self.other = "follower" if self.role == "leader" else "leader"

    @staticmethod
    def read(path: Path) -> int:
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return 0

    def __call__(self, param) -> None:  # eval_end_callback: the epoch's report goes next
        need = param.epoch if self.role == "leader" else param.epoch + 1
        deadline = time.monotonic() + 120
        while self.read(Path(self.folder, self.other)) < need and time.monotonic() < deadline:
            time.sleep(0.02)


def train_pbt(config):
    fit_trial(config, eval_end=[Lockstep(config["dir"])])


def never_runs(config):
    raise AssertionError("a trial that cannot be placed must not start")


# -- helpers ---------------------------------------------------------------------------------
def checkpoints(trial_dir: str) -> list[dict]:
    """A trial's Tune checkpoints, oldest first: folder, manifest and where it came from."""
    found = []
    for folder in sorted(glob.glob(os.path.join(trial_dir, "checkpoint_*"))):
        found.append(
            {
                "folder": folder,
                "manifest": json.loads(Path(folder, "manifest.json").read_text()),
                "source": json.loads(Path(folder, raymodule.tune.SOURCE).read_text()),
            }
        )
    return found


def params_of(ckpt: dict) -> dict:
    return mx.nd.load(os.path.join(ckpt["folder"], "model-%04d.params" % ckpt["manifest"]["epoch"]))


def max_relative_diff(expected: dict, actual: dict) -> float:
    assert sorted(expected) == sorted(actual)
    return max(
        float(np.abs(e.asnumpy() - actual[k].asnumpy()).max())
        / max(float(np.abs(e.asnumpy()).max()), 1e-12)
        for k, e in expected.items()
    )


def placement_error(err: BaseException) -> raymodule.PlacementError | None:
    while err is not None:
        if isinstance(err, raymodule.PlacementError):
            return err
        err = err.__cause__ or err.__context__
    return None


# -- the library -----------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_asha_sweep_of_two_trials_on_two_workers_each_reports_the_best_config(tmp_path):
    tuner = tune.Tuner(
        raymodule.tune.with_workers(train_asha, num_workers=2),
        param_space={"lr": tune.grid_search([0.1, 0.002]), "momentum": 0.9, "epochs": 3},
        tune_config=tune.TuneConfig(
            metric="validation-accuracy",
            mode="max",
            scheduler=ASHAScheduler(max_t=3, grace_period=1, reduction_factor=2),
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0),
    )
    results = tuner.fit()
    assert not results.errors
    assert len(results) == 2
    best = results.get_best_result()
    assert best.config["lr"] == 0.1
    assert best.metrics["epoch"] == 3 and best.metrics["training_iteration"] == 3
    assert best.metrics["validation-accuracy"] > 0.85
    assert best.metrics["train-accuracy"] > 0.85
    worse = next(r for r in results if r.config["lr"] != 0.1)
    assert worse.metrics["validation-accuracy"] < best.metrics["validation-accuracy"]

    # Tune's checkpoint is the run checkpoint of that epoch: plain MXNet loads it
    with best.checkpoint.as_directory() as folder:
        mod = mx.mod.Module.load(os.path.join(folder, "model"), 3)
        assert "fc0_weight" in mod._arg_params
    # each trial's raymodule run is under the experiment's storage, in the folder of the name
    # the trials share, one run per trial, one line per epoch
    runs = tmp_path / "asha" / "raymodule_runs" / "shared"
    assert sorted(os.listdir(runs)) == sorted(r.metrics["trial_id"] for r in results)
    for result in results:
        run = runs / result.metrics["trial_id"]
        assert raymodule.latest_checkpoint(str(run)).epoch == result.metrics["epoch"]
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == list(range(len(lines)))
        assert len(lines) == result.metrics["epoch"]


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:Consider boosting PBT performance")
def test_pbt_exploits_a_checkpoint_and_the_trial_goes_on_from_the_donors_state(tmp_path):
    sync = tmp_path / "lockstep"
    sync.mkdir()
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration",  # one report per epoch
        perturbation_interval=2,
        # the one allowed momentum is the one both have: the exploiting trial trains with
        # exactly the donor's config, so its next epoch must equal the donor's
        hyperparam_mutations={"momentum": [0.9]},
        quantile_fraction=0.5,
    )
    tuner = tune.Tuner(
        raymodule.tune.with_workers(train_pbt, num_workers=1),
        param_space={
            "lr": tune.grid_search([0.1, 0.002]),  # the leader's, the follower's
            "momentum": 0.9,
            "epochs": 5,
            "dir": str(sync),
        },
        tune_config=tune.TuneConfig(metric="validation-accuracy", mode="max", scheduler=scheduler),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path), name="pbt", verbose=0, callbacks=[Processed(str(sync))]
        ),
    )
    results = tuner.fit()
    assert not results.errors
    by_role = {role(r.metrics["trial_id"]): r for r in results}
    leader, follower = by_role["leader"], by_role["follower"]
    leader_id = leader.metrics["trial_id"]

    # Tune's log of exploits: the follower cloned the leader, and took its learning rate
    exploits = [json.loads(line) for line in open(tmp_path / "pbt" / "pbt_global.txt")]
    assert len(exploits) == 1
    target, clone, _, _, _, new_config = exploits[0]
    assert target.startswith("1_lr=0.002") and clone.startswith("0_lr=0.1")
    assert new_config["lr"] == 0.1 and follower.config["lr"] == 0.1
    assert follower.metrics["epoch"] == 5

    # the follower's last checkpoint says it continued from the leader's epoch-4 checkpoint...
    donor = {c["manifest"]["epoch"]: c for c in checkpoints(leader.path)}
    own = checkpoints(follower.path)
    after = next(c for c in own if c["manifest"]["epoch"] == 5)
    restored = after["source"]["restored_from"]
    assert restored["trial_id"] == leader_id and restored["epoch"] == 4
    # ... and it did: one epoch from the leader's parameters and optimizer state (momentum)
    # with the leader's config gives the leader's epoch-5 parameters
    assert max_relative_diff(params_of(donor[5]), params_of(after)) < 1e-5
    # (its own earlier epochs were far from the leader's; Tune numbers the restored trial's
    # checkpoints on from the donor's, so its own epoch-4 folder now holds epoch 5)
    before = next(c for c in own if c["manifest"]["epoch"] == 3)
    assert before["source"]["restored_from"] is None
    assert max_relative_diff(params_of(donor[3]), params_of(before)) > 0.1
    # its raymodule run went on from the adopted checkpoint
    run = tmp_path / "pbt" / "raymodule_runs" / follower.metrics["trial_id"]
    assert raymodule.latest_checkpoint(str(run)).epoch == 5


@pytest.mark.timeout(60)
def test_a_sweep_whose_trials_cannot_fit_fails_at_once_saying_what_to_change(tmp_path):
    tuner = tune.Tuner(
        raymodule.tune.with_workers(never_runs, num_workers=3, cpus=1, head_cpus=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="too-big", verbose=0),
    )
    with pytest.raises(Exception) as raised:
        tuner.fit()
    err = placement_error(raised.value)
    assert err is not None, raised.value
    message = str(err)
    assert "cannot fit the cluster" in message
    assert "2 CPU for the trial process + 3 workers x {CPU: 1} = {CPU: 5}" in message
    assert "the cluster has {CPU: 4} in all" in message
    assert "fewer workers (num_workers)" in message


@pytest.mark.timeout(60)
def test_on_a_cluster_that_may_grow_the_check_asks_for_room_then_gives_up(monkeypatch):
    # The session's Ray cannot grow; pretend it could, as a connected cluster with an
    # autoscaler may: the check then waits (bounded) with a placement group the autoscaler
    # would see, and removes it when it gives up.
    monkeypatch.setattr(raymodule.tune.reservation, "_can_grow", lambda: True)
    monkeypatch.setenv("RAYMODULE_PLACEMENT_TIMEOUT_S", "1")
    monkeypatch.setenv("RAYMODULE_PLACEMENT_REPORT_INTERVAL_S", "0.5")
    spec = raymodule.tune.TrialResources(num_workers=6, cpus=1, gpus=0, head_cpus=0)
    before = set(ray.util.placement_group_table())
    with pytest.raises(raymodule.PlacementError, match=r"waited 1 s for the cluster to grow"):
        raymodule.tune.reservation._check_fits(spec)
    table = ray.util.placement_group_table()
    probes = [table[pg] for pg in set(table) - before]
    assert probes and all(p["state"] == "REMOVED" for p in probes)


def test_trials_sharing_a_name_get_a_run_folder_each():
    location = raymodule.tune.runs._trial_run_location
    assert location("s3://b/runs?region=x", "shared", "ab_00001") == (
        "s3://b/runs/shared?region=x",
        "ab_00001",
    )
    first, second = (location("/runs", "shared", trial) for trial in ("ab_00000", "ab_00001"))
    assert raymodule.RunConfig(name=first[1], storage=first[0]).location == "/runs/shared/ab_00000"
    assert first != second
    assert location("/runs", None, "ab_00000") == ("/runs", "ab_00000")
    with pytest.raises(ValueError, match=r"RunConfig\(name='../x'\)"):
        location("/runs", "../x", "ab_00000")


def test_bad_arguments_fail_in_words():
    with pytest.raises(ValueError, match=r"num_workers=0\): must be an integer >= 1"):
        raymodule.tune.with_workers(train_asha, 0)
    with pytest.raises(ValueError, match="each worker must reserve a CPU or a GPU"):
        raymodule.tune.with_workers(train_asha, 2, cpus=0)
    with pytest.raises(RuntimeError, match="trial functions run through"):
        raymodule.tune.workers()


# -- the sweep job ---------------------------------------------------------------------------
def run_sweep(args, env, cwd, timeout=240):
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "sweep.py"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ray_list(kind: str, dashboard: str, env: dict) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "list", kind, "--address", dashboard]
        + ["--detail", "--format", "json", "--limit", "1000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.timeout(300)
def test_sweep_job_on_a_cluster_puts_each_trials_controller_and_workers_in_its_placement_group(
    s3, tmp_path
):
    # A cluster of its own (never the session's Ray), started with the S3 keys in its
    # environment: the trial processes its raylet starts keep their runs in S3 with them.
    with local_cluster(tmp_path, nodes=0, head_cpus=4, object_store_mb=256) as cluster:
        exports, job_env = cluster.exports, cluster.job_env
        storage = s3.uri(f"{tmp_path.name}/sweeps")
        with tempfile.TemporaryDirectory(prefix="rmt-", dir="/tmp") as cwd:
            out = run_sweep(
                ["--samples", "2", "--epochs", "2", "--workers", "2", "--verbose", "0"]
                + ["--name", "digits", "--storage", storage],
                job_env,
                cwd,
            )
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            assert re.search(
                r"best config: lr=\S+ momentum=\S+: validation-accuracy 0\.\d+", out.stdout
            )
            trial_ids = re.findall(r"^  (\w+_\d+): lr=", out.stdout, re.MULTILINE)
            assert len(trial_ids) == 2

            # every trial's run is in S3, under the sweep
            for trial_id in trial_ids:
                run = s3.uri(f"{tmp_path.name}/sweeps/digits/raymodule_runs/{trial_id}")
                assert raymodule.latest_checkpoint(run) is not None

            # the state API: one placement group per trial, holding the trial, its controller
            # and its 2 workers, and no other group (raymodule made none of its own)
            actors = ray_list("actors", exports["RAY_API_SERVER_ADDRESS"], job_env)
            groups = ray_list("placement-groups", exports["RAY_API_SERVER_ADDRESS"], job_env)
            assert len(groups) == 2
            for group in groups:
                assert [b["unit_resources"] for b in group["bundles"]] == [{"CPU": 1.0}] * 2
            by_group: dict[str, list[str]] = {g["placement_group_id"]: [] for g in groups}
            for actor in actors:
                assert actor["placement_group_id"] in by_group, actor
                by_group[actor["placement_group_id"]].append(actor["class_name"])
            said = "\n".join(
                f"{a['class_name']} {a['state']} pid {a.get('pid')}: {a.get('death_cause')}"
                for a in actors
            )
            for classes in by_group.values():
                assert sorted(classes) == ["Controller", "ImplicitFunc"] + ["ModuleWorker"] * 2, (
                    said + "\n" + out.stdout[-4000:] + out.stderr[-4000:]
                )

            # a sweep whose trials cannot fit the cluster fails, saying what to change (a
            # connected cluster may grow: it waits RAYMODULE_PLACEMENT_TIMEOUT_S first)
            out = run_sweep(
                ["--workers", "5", "--name", "too-big", "--storage", str(tmp_path / "sweeps")],
                {**job_env, "RAYMODULE_PLACEMENT_TIMEOUT_S": "1"},
                cwd,
            )
            assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
            assert "sweep.py: error: this sweep's trials cannot fit the cluster" in out.stderr
            assert "5 workers x {CPU: 1} = {CPU: 5}" in out.stderr
            assert "--workers, --cpus-per-worker and --trial-cpus" in out.stderr
            assert "Traceback" not in out.stderr


def test_sweep_job_rejects_bad_options_with_its_usage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = run_sweep(["--no-such-option"], env, tmp_path, timeout=60)
    assert out.returncode == 2
    assert (
        "usage: sweep.py" in out.stderr and "unrecognized arguments: --no-such-option" in out.stderr
    )
    out = run_sweep(["--lr", "0.5", "0.1"], env, tmp_path, timeout=60)
    assert out.returncode == 2 and "--lr 0.5 0.1: need 0 < MIN <= MAX" in out.stderr
