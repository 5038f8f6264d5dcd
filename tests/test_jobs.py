"""The main job runs as a newcomer would run it, and its model loads in plain MXNet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mxnet as mx

REPO = Path(__file__).resolve().parents[1]


def run_job(args, tmp):
    env = dict(os.environ, RAY_TMPDIR=tmp)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), *args],
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


def test_train_job_rejects_bad_options():
    with tempfile.TemporaryDirectory(prefix="rmj-", dir="/tmp") as tmp:
        out = run_job(["--workers", "0"], tmp)
        assert out.returncode == 2 and "--workers=0" in out.stderr
        out = run_job(["--no-such-option"], tmp)
        assert out.returncode == 2 and "unrecognized arguments" in out.stderr
