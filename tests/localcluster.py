"""A real local Ray cluster for tests: started by cluster/local.sh on 127.0.0.1 with a state file
of its own, stopped by `local.sh stop` and then, by PID, whatever of its nodes' sessions is left;
nothing of those sessions may outlive the cluster."""

from __future__ import annotations

import fnmatch
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SH = ROOT / "cluster" / "local.sh"

# Never the pytest session's Ray: no address, no temp dir of its own from the environment, and
# none of raymodule's settings (names, or fnmatch patterns of names, left out of the environment).
ENV_DROP = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TMPDIR", "RAYMODULE_*")
# but the node's own folder for MXNet's compiled operator wrappers: the session's (conftest), so
# that a cluster's workers keep them there, not in the user's cache folder
ENV_KEPT = ("RAYMODULE_MXNET_CACHE_DIR",)


def read_state(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def running_in_sessions(sessions: set[int]) -> dict[int, str]:
    """{pid: name} of the live (not zombie) processes whose session is one of ``sessions``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) in sessions and fields[0] != "Z":
            found[int(entry.name)] = name
    return found


def kill_sessions(sessions: set[int]) -> None:
    """Last resort if `local.sh stop` failed: SIGKILL what is left of the cluster, by PID."""
    for pid in running_in_sessions(sessions):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class LocalCluster:
    state_file: Path  # where local.sh records the cluster; `stop` deletes it
    env: dict[str, str]  # the scrubbed environment local.sh runs with
    start: subprocess.CompletedProcess  # `local.sh start`: the export lines are on its stdout
    state: dict[str, str]  # the state file as `start` left it (RAY_ADDRESS, SESSIONS, PIDS, ...)
    exports: dict[str, str]  # {name: value} of start's `export NAME=VALUE` lines
    job_env: dict[str, str]  # env + exports + RAY_TMPDIR: for drivers and `ray` commands
    sessions: set[int]  # the nodes' process sessions: every process the cluster started
    started: set[int]  # the PIDs recorded at start
    stop: subprocess.CompletedProcess | None = None  # `local.sh stop`, once the cluster is left
    left: dict[int, str] = field(default_factory=dict)  # what `stop` left running (then killed)

    @property
    def dashboard(self) -> str:
        """The dashboard and job API, http://127.0.0.1:PORT."""
        return self.state["DASHBOARD_URL"]

    @property
    def temp_dir(self) -> Path:
        return Path(self.state["TEMP_DIR"])


@contextmanager
def local_cluster(
    tmp_path: Path,
    *,
    nodes: int,
    head_cpus: int,
    cpus: int | None = None,
    object_store_mb: int | None = None,
    env_drop: Iterable[str] = ENV_DROP,
    python_on_path: bool = False,
    timeout: float = 120,
) -> Iterator[LocalCluster]:
    """``cluster/local.sh start --nodes NODES --head-cpus HEAD_CPUS [--cpus CPUS]
    [--object-store-mb M] --state TMP_PATH/cluster.state``, run with ``PYTHON=sys.executable``
    and without the variables ``env_drop`` names (``python_on_path``: sys.executable's folder
    first on the PATH, so that a `ray job submit` entrypoint's `python` is this one).

    On leaving: `local.sh stop`, then SIGKILL by PID for whatever is left in the nodes'
    sessions; then (unless the body raised) asserts that `stop` succeeded and left nothing of
    those sessions running, neither a process recorded at start nor one started later."""
    state_file = Path(tmp_path) / "cluster.state"
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ENV_KEPT or not any(fnmatch.fnmatchcase(key, p) for p in env_drop)
    }
    env["PYTHON"] = sys.executable
    if python_on_path:
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    command = [str(LOCAL_SH), "start", "--nodes", str(nodes), "--head-cpus", str(head_cpus)]
    if cpus is not None:
        command += ["--cpus", str(cpus)]
    if object_store_mb is not None:
        command += ["--object-store-mb", str(object_store_mb)]
    command += ["--state", str(state_file)]

    sessions: set[int] = set()
    started: set[int] = set()
    cluster = stop = None
    try:
        start = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if state_file.exists():
            sessions = {int(s) for s in read_state(state_file)["SESSIONS"].split()}
        assert start.returncode == 0, start.stderr
        state = read_state(state_file)
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", start.stdout, re.MULTILINE))
        started = {int(pid) for pid in state["PIDS"].split()}
        cluster = LocalCluster(
            state_file=state_file,
            env=env,
            start=start,
            state=state,
            exports=exports,
            job_env={**env, **exports, "RAY_TMPDIR": state["TEMP_DIR"]},
            sessions=sessions,
            started=started,
        )
        yield cluster
    finally:
        if state_file.exists():
            stop = subprocess.run(
                [str(LOCAL_SH), "stop", "--state", str(state_file)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        left = running_in_sessions(sessions)
        kill_sessions(sessions)  # by PID, whatever `stop` left
        if cluster is not None:
            cluster.stop, cluster.left = stop, left
    assert stop is not None and stop.returncode == 0, stop and stop.stderr
    # Every process recorded at start is gone, and so is every other process of the nodes'
    # sessions (the worker processes the raylets started later).
    assert not started & set(left), f"still running after stop: {left}"
    assert not left, f"still running after stop: {left}"
