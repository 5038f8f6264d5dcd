"""`ray job submit` runs the jobs of jobs/ on a real Ray head on 127.0.0.1 with its dashboard,
started by cluster/local.sh (explicit free ports, a private /tmp/rmc-XXXX temp dir) and stopped
by PID at the end: the main job succeeds and its logs hold its test accuracy; a job stopped with
`ray job stop` after it committed a checkpoint, submitted again under a new submission id with
the same --name, resumes from that checkpoint and finishes the run."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import wait_until
from localcluster import ENV_DROP, local_cluster, running_in_sessions
from ray.job_submission import JobStatus, JobSubmissionClient

import raymodule

ROOT = Path(__file__).resolve().parent.parent
TRAIN_IMAGES = 1437  # jobs/train.py's training split of the 1,797 digits


@dataclass
class Head:
    url: str  # the dashboard, where jobs are submitted
    temp_dir: Path
    env: dict[str, str]  # for `ray job ...` commands
    sessions: set[int]  # the nodes' process sessions: every process the cluster started
    client: JobSubmissionClient


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with the dashboard and 4 CPUs (2 workers per job, and room for a
    stopped job's workers while they go); every process it started is stopped by PID."""
    # Neither the pytest session's Ray nor a repository on PYTHONPATH: the jobs find raymodule
    # in the working dir that `ray job submit` uploads. A job's `python` is the first on the
    # PATH that the head's processes see: sys.executable's.
    with local_cluster(
        tmp_path_factory.mktemp("head"),
        nodes=0,
        head_cpus=4,
        object_store_mb=256,
        env_drop=(*ENV_DROP, "PYTHONPATH"),
        python_on_path=True,
    ) as cluster:
        url = cluster.dashboard
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        yield Head(
            url, cluster.temp_dir, cluster.job_env, cluster.sessions, JobSubmissionClient(url)
        )


def ray_job(head: Head, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """``ray job ARGS`` against the head, run from the repository root as a user would."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "job", args[0], "--address", head.url]
    return subprocess.run(
        command + list(args[1:]),
        cwd=ROOT,
        env=head.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(head: Head, submission_id: str, job_args: list[str], wait: bool = True):
    """``ray job submit --working-dir . --submission-id ID -- python jobs/...``."""
    out = ray_job(
        head,
        "submit",
        *([] if wait else ["--no-wait"]),
        "--working-dir",
        ".",
        "--submission-id",
        submission_id,
        "--",
        "python",
        *job_args,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def logs(head: Head, submission_id: str) -> str:
    return head.client.get_job_logs(submission_id)


def metric_lines(run: Path) -> list[dict]:
    """The epoch lines of a run's metrics.jsonl (not its membership-change lines)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "epoch" in line]


@pytest.mark.timeout(180)
def test_submitted_job_succeeds_and_its_logs_hold_the_test_accuracy(head, tmp_path):
    storage = tmp_path / "runs"
    args = ["jobs/train.py", "--name", "digits", "--storage", str(storage), "--epochs", "2"]
    submit(head, "train-once", args)

    assert head.client.get_job_status("train-once") == JobStatus.SUCCEEDED
    info = head.client.get_job_info("train-once")
    assert info.driver_info.node_ip_address == "127.0.0.1"
    text = logs(head, "train-once")
    accuracy = float(re.search(r"test accuracy: ([0-9.]+) after 2 epochs", text).group(1))
    assert 0.5 < accuracy <= 1.0, text[-2000:]  # chance is 0.1
    steps = 2 * (TRAIN_IMAGES // 64)
    assert f"latest checkpoint: {storage}/digits/ckpt-{steps:010d} (epoch 2, step {steps})" in text
    assert re.search(r"samples/s=[0-9,]+, workers=2", text), "the progress bar's postfix"
    assert [line["epoch"] for line in metric_lines(storage / "digits")] == [0, 1]

    # The working dir the job ran in was uploaded without what git ignores or keeps to itself.
    uri = info.runtime_env["working_dir"]  # gcs://_ray_pkg_<hash>.zip
    files = head.temp_dir / "session_latest/runtime_resources/working_dir_files"
    package = files / uri.rsplit("/", 1)[-1].removesuffix(".zip")
    uploaded = {p.relative_to(package).parts[0] for p in package.rglob("*")}
    assert {"jobs", "raymodule", "pyproject.toml"} <= uploaded
    assert not uploaded & {".git", "raymodule_runs", ".pytest_cache", "raymodule.egg-info"}
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    assert size < 5 * 1024**2, f"the working dir upload is {size / 1024**2:.1f} MiB"


def wait_for_first_commit(head: Head, job: str, run: Path) -> None:
    """Until the running job ``job`` has committed a checkpoint of ``run`` (``latest`` is
    written after the manifest); fails if the job ended first."""

    def committed() -> bool:
        if (run / "latest").exists():
            return True
        status = head.client.get_job_status(job)
        assert not status.is_terminal(), f"{status}: {logs(head, job)[-3000:]}"
        return False

    wait_until(
        committed, 120, f"{job}'s first checkpoint", 0.1, seen=lambda: logs(head, job)[-3000:]
    )


@pytest.mark.timeout(300)
def test_stopped_job_submitted_again_with_its_name_resumes_its_run(head, tmp_path):
    storage = tmp_path / "runs"
    run = storage / "long"
    # Epochs enough that the job still trains when the stop lands: its first commit waits for
    # the writer's process to import MXNet (9 s on a slow 2-core machine, while training goes
    # on), and with 10 epochs a job ran its last steps before `ray job stop` reached it.
    epochs, batch = 30, 8
    steps = epochs * (TRAIN_IMAGES // batch)
    args = ["jobs/train.py", "--name", "long", "--storage", str(storage)]
    args += ["--epochs", str(epochs), "--batch-size", str(batch), "--lr", "0.02"]
    args += ["--checkpoint-every", "50"]
    submit(head, "long-1", args, wait=False)

    # Stopped once it has committed a checkpoint (`latest` is written after the manifest).
    wait_for_first_commit(head, "long-1", run)
    stop = ray_job(head, "stop", "long-1")
    assert stop.returncode == 0, stop.stderr
    assert head.client.get_job_status("long-1") == JobStatus.STOPPED
    stopped_at = raymodule.latest_checkpoint(str(run))
    assert stopped_at is not None and 0 < stopped_at.global_step < steps, (
        "the job was to be stopped while it trained"
    )

    submit(head, "long-2", args)  # a new submission id, the same run name
    assert head.client.get_job_status("long-2") == JobStatus.SUCCEEDED
    text = logs(head, "long-2")
    assert f"run 'long' resumes from {stopped_at.name}: epoch {stopped_at.epoch}, " in text
    assert re.search(rf"test accuracy: [0-9.]+ after {epochs} epochs", text)
    assert f"latest checkpoint: {run}/ckpt-{steps:010d} (epoch {epochs}, step {steps})" in text
    lines = metric_lines(run)
    assert [line["epoch"] for line in lines] == list(range(epochs))
    assert lines[-1]["global_step"] == steps


def listening(pids: dict[int, str]) -> dict[str, set[str]]:
    """``{"name (pid)": {host, ...}}``: the addresses these processes accept TCP connections on."""
    listeners = {}  # socket inode -> host
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A":  # LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words in host byte order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            listeners[fields[9]] = socket.inet_ntop(family, raw)
    found: dict[str, set[str]] = {}
    for pid, name in pids.items():
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # gone meanwhile
        for link in links:
            inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
            if inode in listeners:
                found.setdefault(f"{name} ({pid})", set()).add(listeners[inode])
    return found


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.timeout(180)
def test_a_running_job_and_its_cluster_listen_on_loopback_only(head, tmp_path):
    storage = tmp_path / "runs"
    # epochs enough that the workers still run when their sockets are listed (it is stopped
    # then): with 32 batches a call, 3 epochs could end between the first checkpoint and that
    args = ["jobs/train.py", "--name", "net", "--storage", str(storage), "--epochs", "100"]
    args += ["--batch-size", "8", "--checkpoint-every", "50"]
    submit(head, "net-1", args, wait=False)
    wait_for_first_commit(head, "net-1", storage / "net")  # the workers and their group are up
    sockets = listening(running_in_sessions(head.sessions))
    stop = ray_job(head, "stop", "net-1")
    assert stop.returncode == 0, stop.stderr
    assert any("ModuleWork" in name for name in sockets), sockets  # the job's workers were seen
    exposed = {name: hosts for name, hosts in sockets.items() if not all(map(is_loopback, hosts))}
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
