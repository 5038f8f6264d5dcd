"""The jobs run as a newcomer would run them: the main job's model loads in plain MXNet, a job
started again with its name resumes, and bad input (an unknown option, storage that cannot be
written) ends a job at once with a message that says what to change, never a traceback."""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mxnet as mx
import pytest

import raymodule

REPO = Path(__file__).resolve().parents[1]


def run_job(args, tmp, job="train.py", env=None, timeout=280):
    env = dict(os.environ, RAY_TMPDIR=tmp, **(env or {}))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / job), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
    )


def test_train_job_learns_digits_and_saves_an_mxnet_checkpoint():
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        out = run_job(["--epochs", "6", "--output", "model"], tmp)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out.stdout).group(1))
        assert accuracy > 0.9
        assert "epoch 6" in out.stdout  # the progress bars, with throughput and world size
        assert re.search(r"accuracy=0\.[0-9]{3}, samples/s=[0-9,]+, workers=2\]", out.stdout)
        assert os.path.join(tmp, "model", "model-symbol.json") in out.stdout
        mod = mx.mod.Module.load(os.path.join(tmp, "model", "model"), 6)
        assert "fc0_weight" in mod._arg_params


def test_train_job_started_again_with_its_name_resumes_its_run():
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        out = run_job(["--epochs", "1", "--name", "digits", "--checkpoint-every", "5"], tmp)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        run = os.path.join(tmp, "raymodule_runs", "digits")
        assert f"latest checkpoint: {run}/ckpt-0000000022 (epoch 1, step 22)" in out.stdout
        out = run_job(["--epochs", "2", "--name", "digits"], tmp)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        assert "run 'digits' resumes from ckpt-0000000022: epoch 1, batch 0" in out.stderr
        assert "epoch 2" in out.stdout and "epoch 1" not in out.stdout
        assert f"latest checkpoint: {run}/ckpt-0000000044 (epoch 2, step 44)" in out.stdout


def test_train_job_rejects_bad_options():
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        out = run_job(["--workers", "0"], tmp)
        assert out.returncode == 2 and "--workers=0" in out.stderr
        out = run_job(["--checkpoint-every", "-1"], tmp)
        assert out.returncode == 2
        assert "(checkpoint-every=-1): must be an integer >= 0" in out.stderr


def test_digits_rec_job_packs_records_and_train_job_trains_on_them():
    """The digits as MXNet RecordIO files, trained on by workers reading their own records
    (jobs/train.py's --data recordio model and loop); train.py refuses recordio options that
    cannot work, files that do not match included, in words."""
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        out = run_job(["--epochs", "3", "--records", "recs", "--name", "dr"], tmp, "digits_rec.py")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        assert "1437 training and 360 test images" in out.stdout
        accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out.stdout).group(1))
        assert accuracy > 0.8
        assert re.search(r"accuracy=0\.[0-9]{3}, samples/s=[0-9,]+, workers=2\]", out.stdout)
        assert sorted(os.listdir(os.path.join(tmp, "recs"))) == [
            "test.idx",
            "test.rec",
            "train.idx",
            "train.rec",
        ]
        recs = os.path.join(tmp, "recs")
        out = run_job(["--data", "recordio", "--rec", f"{recs}/train.rec"], tmp)
        assert out.returncode == 2 and "--data recordio needs --rec and --idx" in out.stderr
        mismatched = ["--rec", f"{recs}/test.rec", "--idx", f"{recs}/train.idx"]
        out = run_job(["--data", "recordio", *mismatched], tmp)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "train.idx' does not match rec" in out.stderr, out.stderr[-2000:]


def test_bucketing_job_trains_a_language_model_whose_perplexity_falls():
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        out = run_job(["--epochs", "3", "--name", "lm"], tmp, job="bucketing.py")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        perplexity = [
            float(v) for v in re.findall(r"validation perplexity ([0-9.]+)\n", out.stdout)
        ]
        assert len(perplexity) == 3 and perplexity[0] > perplexity[1] > perplexity[2]
        assert "buckets [10, 20, 30, 40]" in out.stdout and "epoch 3" in out.stdout
        assert re.search(r"perplexity=[0-9.]+, samples/s=[0-9,]+, workers=2\]", out.stdout)
        run = os.path.join(tmp, "raymodule_runs", "lm")
        ckpt = raymodule.latest_checkpoint(run)
        assert ckpt.epoch == 3 and "model-40-symbol.json" in ckpt.files
        out = run_job(["--workers", "0"], tmp, job="bucketing.py")
        assert out.returncode == 2 and "--workers=0" in out.stderr


def test_benchmark_data_counts_what_a_dataset_iter_sends_its_workers():
    """``jobs/benchmark.py --data`` on raymodule, fed by a DatasetIter: the dataset goes into
    the object store once, and each step sends each worker only its half of the batch's
    indices (64 int64). Its count wraps the controller's ``run``, whose arguments grew once
    without it (the ``--data`` runs failed then, and nothing ran them)."""
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        args = ["--data", "--configs", "ray2_dataset", "--models", "mlp", "--batches", "10"]
        args += ["--warmup", "10", "--json", "report.json"]
        out = run_job(args, tmp, job="benchmark.py", timeout=180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        report = json.loads(Path(tmp, "report.json").read_text())
        result = report["results"]["mlp"]["ray2_dataset"]
        assert result["samples_per_s"] > 0
        counted = result["bytes"]
        assert counted["samples_per_worker_step"] == 0  # no samples put while it trains
        assert counted["indices_per_worker_step"] == 64 * 8
        assert counted["dataset_once"] == 10 * 128 * (784 + 1) * 4  # float32 data and labels


HELPERS = {"jobtools.py", "workload.py", "meters.py"}  # modules the jobs import, not jobs
JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.py") if p.name not in HELPERS)
TRAINING_JOBS = ["train.py", "bucketing.py"]  # the jobs with a run in --storage


@pytest.mark.parametrize("job", JOBS)
def test_job_given_an_unknown_option_prints_its_usage_naming_it(job):
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        out = run_job(["--no-such-option", "3"], tmp, job=job, timeout=60)
        assert out.returncode == 2, out.stderr[-3000:]
        assert out.stderr.startswith(f"usage: {job} ")
        assert f"{job}: error: unrecognized arguments: --no-such-option 3" in out.stderr


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = "raymodule-test-secret-never-printed"


@pytest.mark.parametrize("job", TRAINING_JOBS)
@pytest.mark.parametrize("where", ["s3-without-server", "local-under-a-file"])
def test_job_with_storage_it_cannot_write_ends_at_once_saying_what_to_change(job, where):
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        if where == "s3-without-server":
            storage = f"s3://bucket/runs?endpoint_override=127.0.0.1:{closed_port()}&scheme=http"
            cause = "Could not connect to server"
        else:
            Path(tmp, "a-file").write_text("")
            storage = os.path.join(tmp, "a-file", "runs")
            cause = "Not a directory"
        keys = {
            "AWS_ACCESS_KEY_ID": "raymodule-test",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        # the user's defaults: no setting shortens storage retries; the timeout only bounds a
        # hang (the S3 client's own retries alone took over 12 s before the job checked first)
        out = run_job(["--storage", storage, "--name", "r"], tmp, job=job, env=keys, timeout=60)
        assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        error = out.stderr[out.stderr.index(f"{job}: error: --storage ") :]
        assert cause in error and "Pass a --storage " in error, error
        assert SECRET not in out.stdout + out.stderr
        assert not Path(tmp, "ray").exists(), "it failed before starting Ray"


@pytest.mark.parametrize("job", JOBS)
def test_job_header_gives_both_command_lines_and_help_explains_every_option(job):
    doc = ast.get_docstring(ast.parse((REPO / "jobs" / job).read_text()))
    assert re.search(rf"^    python jobs/{job}\b", doc, re.MULTILINE), doc
    assert re.search(rf"^    ray job submit --working-dir \. -- python jobs/{job}\b", doc, re.M)

    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / job), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    options = out.stdout.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    explained = {}
    for entry in entries:
        first, *more = entry.strip().split("\n")
        names, _, text = re.split(r"(\s{2,}|$)", first, maxsplit=1)
        explained[re.findall(r"--[\w-]+", names)[-1]] = " ".join([text, *more]).split()
    usage = out.stdout.split("\n\n", 1)[0]
    assert set(explained) == set(re.findall(r"\[(--[\w-]+)", usage)) | {"--help"}
    for option, words in explained.items():
        assert len(words) >= 3, f"--help does not explain {option}: {' '.join(words)!r}"
        assert "(default: None)" not in " ".join(words), option
