"""The main job runs as a newcomer would run it, and its model loads in plain MXNet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mxnet as mx

import raymodule

REPO = Path(__file__).resolve().parents[1]


def run_job(args, tmp, job="train.py"):
    env = dict(os.environ, RAY_TMPDIR=tmp)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / job), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp,
    )


def test_train_job_learns_digits_and_saves_an_mxnet_checkpoint():
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        out = run_job(["--epochs", "6", "--output", "model"], tmp)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out.stdout).group(1))
        assert accuracy > 0.9
        assert "epoch 6" in out.stdout  # the progress bars
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
        out = run_job(["--no-such-option"], tmp)
        assert out.returncode == 2 and "unrecognized arguments" in out.stderr
        out = run_job(["--checkpoint-every", "-1"], tmp)
        assert out.returncode == 2
        assert "(checkpoint-every=-1): must be an integer >= 0" in out.stderr


def test_bucketing_job_trains_a_language_model_whose_perplexity_falls():
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        out = run_job(["--epochs", "3", "--name", "lm"], tmp, job="bucketing.py")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        perplexity = [
            float(v) for v in re.findall(r"validation perplexity ([0-9.]+)\n", out.stdout)
        ]
        assert len(perplexity) == 3 and perplexity[0] > perplexity[1] > perplexity[2]
        assert "buckets [10, 20, 30, 40]" in out.stdout and "epoch 3" in out.stdout
        run = os.path.join(tmp, "raymodule_runs", "lm")
        ckpt = raymodule.latest_checkpoint(run)
        assert ckpt.epoch == 3 and "model-40-symbol.json" in ckpt.files
        out = run_job(["--workers", "0"], tmp, job="bucketing.py")
        assert out.returncode == 2 and "--workers=0" in out.stderr
