"""The `raymodule` command on real runs: `report` and `runs`, on disk and on real S3, run as a
user runs them (the installed console script, in a subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import mxnet as mx
import pytest
from conftest import Interrupted, dataset, interrupt_at, mlp
from PIL import Image  # matplotlib's own dependency

import raymodule
from raymodule import RunConfig, latest_checkpoint, storage

X, Y = dataset(n=96)
X_VAL, Y_VAL = dataset(n=32, seed=1)


def train(config: RunConfig, num_epoch: int, stop_at: tuple[int, int] | None = None) -> None:
    """The MLP on 2 workers with a validation set; ``stop_at=(epoch, nbatch)`` interrupts it
    (once a checkpoint inside that epoch is committed)."""
    run_location = f"{config.storage}/{config.name}"
    interrupt = interrupt_at(*stop_at, run_location) if stop_at else None
    mx.random.seed(0)
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.fit(
            mx.io.NDArrayIter(X, Y, batch_size=8),
            eval_data=mx.io.NDArrayIter(X_VAL, Y_VAL, batch_size=8),
            eval_metric=["acc", "ce"],
            num_epoch=num_epoch,
            optimizer_params={"learning_rate": 0.1, "momentum": 0.9},
            batch_end_callback=interrupt,
            run=config,
        )


def command() -> list[str]:
    """The installed console script of this interpreter's environment."""
    script = os.path.join(sysconfig.get_path("scripts"), "raymodule")
    found = script if os.path.exists(script) else shutil.which("raymodule")
    assert found, "the `raymodule` console script is not installed: pip install -e ."
    return [found]


def cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
    )


def field(out: str, label: str) -> str:
    """The text after ``label`` on its summary line."""
    found = re.search(rf"^  {label} +(.+)$", out, re.M)
    assert found, f"no {label!r} line in:\n{out}"
    return found.group(1)


@pytest.fixture(scope="module")
def storage_dir(tmp_path_factory):
    """Runs on disk: `cut`, interrupted in its second epoch and resumed to 3 epochs; `broken`,
    whose only checkpoint was never committed; and a folder that is no run."""
    root = tmp_path_factory.mktemp("runs")
    config = RunConfig(name="cut", storage=str(root), checkpoint_every=4)
    with pytest.raises(Interrupted):
        train(config, num_epoch=3, stop_at=(1, 6))
    train(config, num_epoch=3)
    storage.write_bytes(str(root / "broken" / "ckpt-0000000004" / "model-symbol.json"), b"{}")
    (root / "notes").mkdir()
    return root


def test_report_prints_the_runs_numbers_and_draws_a_png(storage_dir):
    run = storage_dir / "cut"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = epochs[-1]
    ckpt = latest_checkpoint(str(run))
    out = cli("report", str(run))
    assert out.returncode == 0, out.stderr

    text = out.stdout
    assert text.startswith(f"run cut  ({run})")
    assert field(text, "epochs trained") == "3 (epochs 0-2)"
    assert field(text, "global steps") == str(last["global_step"]) == "36"
    val = last["validation"]
    assert field(text, "final validation") == (
        f"accuracy={val['accuracy']:.4g}, cross-entropy={val['cross-entropy']:.4g}"
    )
    best = max(epochs, key=lambda e: e["validation"]["accuracy"])  # first of a tie, as reported
    assert (
        f"accuracy={best['validation']['accuracy']:.4g} at epoch {best['epoch']} (highest)" in text
    )
    lowest = min(epochs, key=lambda e: e["validation"]["cross-entropy"])
    assert f"cross-entropy={lowest['validation']['cross-entropy']:.4g} at epoch" in text
    assert field(text, "world size") == "2"
    resumed = epochs[1]["resumed_at_batch"]
    assert resumed > 0 and field(text, "resumed") == f"epoch 1 at batch {resumed}"
    writes = [c["seconds"] for e in epochs for c in e["checkpoints"]]
    assert field(text, "checkpoints").startswith(f"{len(writes)} committed, mean write")
    assert field(text, "latest checkpoint").startswith(
        f"ckpt-0000000036: epoch 3, batch 0, step 36, {ckpt.manifest['time']}"
    )
    speeds = [e["samples_per_s"] for e in epochs]
    assert field(text, "throughput").startswith(f"{sum(speeds) / 3:,.0f} samples/s, mean of 3")

    png = run / "report.png"
    assert text.rstrip().endswith(f"report written to {png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 600

    elsewhere = storage_dir / "pictures" / "cut.png"  # --output, its folder made
    out = cli("report", str(run), "--output", str(elsewhere))
    assert out.returncode == 0 and elsewhere.read_bytes()[:4] == b"\x89PNG"


def test_runs_lists_each_run_with_its_latest_verified_checkpoint(storage_dir):
    out = cli("runs", str(storage_dir))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"runs under {storage_dir}:"
    assert lines[1].split() == ["RUN", "EPOCHS", "LATEST", "CHECKPOINT", "EPOCH", "BATCH",
                                "STEP", "TIME", "(UTC)"]  # fmt: skip
    ckpt = latest_checkpoint(str(storage_dir / "cut"))
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows == {
        "broken": ["-", "no", "committed", "checkpoint"],
        "cut": ["3", "ckpt-0000000036", "3", "0", "36", ckpt.manifest["time"]],
    }  # `notes` is no run and `pictures` (a report's) neither


def test_report_and_runs_read_a_run_in_s3(s3, tmp_path):
    location = s3.uri(f"{tmp_path.name}/runs")
    train(RunConfig(name="s3run", storage=location), num_epoch=2)
    out = cli("runs", location)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^s3run +2 +ckpt-0000000024 +2 +0 +24 ", out.stdout, re.M), out.stdout

    run = storage.Folder(location).child("s3run")
    out = cli("report", run.location, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert field(out.stdout, "global steps") == "24"
    assert f"report written to {tmp_path}/s3run-report.png" in out.stdout
    assert (tmp_path / "s3run-report.png").read_bytes()[:4] == b"\x89PNG"
    assert s3.endpoint in out.stdout and "SECRET" not in out.stdout.upper()


def test_bad_input_exits_2_with_the_reason_in_words(storage_dir, s3, tmp_path):
    def fails(*args, env=None) -> str:
        out = cli(*args, env=env)
        assert out.returncode == 2 and not out.stdout, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        return out.stderr.strip()

    missing = tmp_path / "nothing-here"
    assert fails("report", str(missing)) == (
        f"raymodule report: error: no run at {missing}: there is no such folder"
    )
    assert fails("runs", str(missing)).endswith(f"nothing at {missing}: there is no such folder")
    assert "'foo://x' is not a storage location raymodule can use" in fails("report", "foo://x")
    assert "'foo://x' is not a storage location" in fails("runs", "foo://x")
    assert fails("report", str(storage_dir)).endswith(
        f"{storage_dir} is not a run folder: it has no metrics.jsonl; the runs in it are: "
        "broken, cut"
    )
    assert "has 1 checkpoint folders but no metrics.jsonl" in fails(
        "report", str(storage_dir / "broken")
    )
    denied = fails("runs", s3.uri("x"), env={"AWS_SECRET_ACCESS_KEY": "wrong-secret-key"})
    assert "s3://raymodule-test/x?" in denied and "wrong-secret-key" not in denied
    assert cli("report").returncode == 2  # argparse: RUN_DIR missing


def test_crafted_run_folders_are_read_without_trust(tmp_path):
    """Manifests naming a file outside their folder, a link, a FIFO, or files as a list; lines
    of metrics.jsonl that are no objects; a `$` in a metric's name: `runs` and `report` read
    nothing outside the run, never hang, say what they skipped and go on."""
    root = tmp_path / "crafted"
    run = root / "evil"
    secret = b"outside the run"
    root.mkdir()
    (root / "secret.txt").write_bytes(secret)
    entry = {"size": len(secret), "sha256": hashlib.sha256(secret).hexdigest()}

    def checkpoint_with(step: int, files) -> str:
        folder = run / f"ckpt-{step:010d}"
        folder.mkdir(parents=True)
        manifest = {"format": 1, "epoch": 1, "batch": 0, "global_step": step, "files": files}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return str(folder)

    checkpoint_with(1, ["model-symbol.json"])
    checkpoint_with(2, {"../../secret.txt": entry})
    os.mkfifo(os.path.join(checkpoint_with(3, {"pipe": entry}), "pipe"))
    os.symlink(root / "secret.txt", os.path.join(checkpoint_with(4, {"link": entry}), "link"))
    epoch = {"epoch": 0, "global_step": 4, "train": {"a$b": 0.5}, "world_size": 1}
    (run / "metrics.jsonl").write_text("\n".join([json.dumps(epoch), "[1, 2]", "5", '"x"']))

    out = cli("runs", str(root))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[2].split() == ["evil", "1", "no", "committed", "checkpoint"]
    for why in (
        "ckpt-0000000004/link is not read: ",
        "ckpt-0000000003/pipe is not read: ",
        "it names the file '../../secret.txt', which is not a plain name",
        "'files' is a list, not an object",
    ):
        assert why in out.stderr, out.stderr

    out = cli("report", str(run))
    assert out.returncode == 0, out.stderr
    assert field(out.stdout, "final train") == "a$b=0.5"
    assert field(out.stdout, "latest checkpoint") == "no committed checkpoint that verifies"
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "Traceback" not in out.stderr


def test_report_lists_membership_changes_and_work_split_changes(tmp_path):
    """A run that grew, lost a drained worker and re-weighted its split (work_load_list="auto"):
    the report says each, with what changed, and its plot draws them."""
    run = tmp_path / "elastic"
    run.mkdir()
    lines = [
        {"epoch": 0, "global_step": 8, "world_size": 1, "time": "2026-12-01T00:00:10Z"},
        {"event": "membership", "change": "grown", "world_size": 3, "step": 8,
         "time": "2026-12-01T00:00:11Z"},
        {"event": "work_load", "step": 12, "weights": {"0": 1.25, "1": 0.75, "2": 1.0},
         "seconds_per_sample": {"0": 1e-4, "1": 2e-4, "2": 1e-4}, "time": "2026-12-01T00:00:12Z"},
        {"event": "membership", "change": "drained", "world_size": 2, "step": 14,
         "time": "2026-12-01T00:00:13Z"},
        {"epoch": 1, "global_step": 16, "world_size": 2, "time": "2026-12-01T00:00:20Z"},
        {"event": "work_load", "step": 20, "weights": ["not", "a", "mapping"]},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = cli("report", str(run))
    assert out.returncode == 0, out.stderr
    membership = re.findall(r"^  membership +(.+)$", out.stdout, re.M)
    assert membership == [
        "2026-12-01T00:00:11Z: grown, world size 3",
        "2026-12-01T00:00:13Z: drained, world size 2",
    ]
    assert field(out.stdout, "work split") == (
        "2026-12-01T00:00:12Z: step 12: slot 0 1.25, slot 1 0.75, slot 2 1"
    )
    assert field(out.stdout, "world size") == "1 -> 3 -> 2"
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_help_explains_the_commands_and_python_m_works_too():
    out = cli("--help")
    assert out.returncode == 0 and "report" in out.stdout and "runs" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "raymodule.cli", "report", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "usage: raymodule report" in out.stdout
    assert "--output PNG" in out.stdout


def test_the_sub_packages_are_reached_from_a_plain_import():
    code = "import raymodule; print(raymodule.data.DatasetIter.__name__, raymodule.tune.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["DatasetIter", "raymodule.tune"], out.stderr[-2000:]


def test_importing_raymodule_does_not_import_matplotlib():
    code = (
        "import sys, raymodule, raymodule.report, raymodule.cli; print('matplotlib' in sys.modules)"  # noqa: E501
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_the_controller_and_a_lone_workers_modules_import_neither_mxnet_nor_torch():
    """A module family's workers are placed by its controller's first call, and a worker
    imports torch only to join a group: MXNet or torch imported before then would hold up
    every start by seconds of CPU."""
    code = (
        "import sys, raymodule.controller.actor, raymodule.worker.actor; "
        "print(sorted({'mxnet', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
