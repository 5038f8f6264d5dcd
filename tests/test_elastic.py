"""Elastic runs on a real multi-node Ray (three 1-CPU nodes on 127.0.0.1) under real faults,
keyed to a step: each ends with the parameters plain MXNet trains on the same batches.

Scenarios run in processes of their own (tests/elastic_cluster.py), which start and stop their
own clusters: a process holds one Ray, and the session's is not a multi-node one. Most run
one after another on one cluster, in one process, which replaces the nodes a scenario
removed or drained (starting a cluster costs 15-20 s here, adding a node a few); the others
each start their own, and run alone, before those.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import assert_on_their_share

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "elastic_cluster.py")
# the scenarios after which the cluster is as they found it (every node, every CPU free) once
# the nodes they removed or drained are replaced; not those that need a cluster of their own
# (start_small's one node, the S3 server's keys, a driver of its own for process)
ON_ONE_CLUSTER = {
    "drain",
    "grow",
    "floor",
    "floor_stop",
    "floor_stop_rows",
    "floor_stop_callback",
    "admit",
    "node",
    "kill",
    "hang",
    "all",
    "controller",
    "epoch_end",
    "reform_kill",
    "reform_stop",
    "sigterm",
    "frozen",
}
LOG_SHOWN = 12_000  # characters of a failed scenario's output shown
SCENARIO_S = 270  # the most one scenario may take: less than pytest's 300 s for a test
CLOSE_S = 120  # the most the shared cluster may take to stop once told


class Scenarios:
    """Runs scenarios: those of :data:`ON_ONE_CLUSTER` through one ``--serve`` process (started
    at the first, started again if one ended it), each other one in a process of its own,
    with the shared cluster stopped first. Each ``run`` returns the scenario's result, with
    what its process printed meanwhile as ``log``."""

    def __init__(self, folder: Path):
        self._folder = folder
        self._server: subprocess.Popen | None = None
        self._ray_tmp: str | None = None

    def run(self, name: str, tmp_path: Path) -> dict:
        out = tmp_path / f"{name}.json"
        if name in ON_ONE_CLUSTER:
            log = self._served(name, out)
        else:
            self.close()
            log = self._alone(name, out)
        result = json.loads(out.read_text())
        result["log"] = log
        return result

    def _alone(self, name: str, out: Path) -> str:
        ray_tmp = tempfile.mkdtemp(prefix="rel-", dir="/tmp")  # short: Ray's socket paths
        try:
            proc = subprocess.run(
                [sys.executable, SCRIPT, name, str(out)],
                env=dict(os.environ, RAY_TMPDIR=ray_tmp),
                capture_output=True,
                text=True,
                timeout=SCENARIO_S,
            )
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return proc.stdout + proc.stderr

    def _served(self, name: str, out: Path) -> str:
        log_path = self._folder / "serve.log"
        if self._server is not None and self._server.poll() is not None:
            self.close()  # it ended between scenarios: a new one
        if self._server is None:
            self._start(log_path)
        start = log_path.stat().st_size
        try:
            self._server.stdin.write(f"{name} {out}\n")
            self._server.stdin.flush()
            deadline = time.monotonic() + SCENARIO_S
            while not out.exists():
                ended = self._server.poll() is not None
                if ended or time.monotonic() > deadline:
                    why = "ended its process" if ended else f"took over {SCENARIO_S} s"
                    pytest.fail(f"the scenario {why}:\n" + _read_from(log_path, start)[-8000:])
                time.sleep(0.2)
        except BaseException:  # failed, timed out, interrupted: the next starts a new cluster
            self.close(kill=True)
            raise
        return _read_from(log_path, start)

    def _start(self, log_path: Path) -> None:
        self._ray_tmp = tempfile.mkdtemp(prefix="rel-", dir="/tmp")
        try:
            with open(log_path, "ab") as log:
                self._server = subprocess.Popen(
                    [sys.executable, SCRIPT, "--serve"],
                    env=dict(os.environ, RAY_TMPDIR=self._ray_tmp),
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,  # its Ray processes are stopped with it
                )
        except BaseException:
            shutil.rmtree(self._ray_tmp, ignore_errors=True)
            raise

    def close(self, kill: bool = False) -> None:
        """Stops the shared cluster: at stdin's end, waiting up to ``CLOSE_S``, or at once
        with ``kill``; then kills whatever is left of its process group."""
        if self._server is None:
            return
        server, self._server = self._server, None
        try:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                server.stdin.close()  # a server that reads on stops its cluster
                if not kill:
                    server.wait(timeout=CLOSE_S)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            shutil.rmtree(self._ray_tmp, ignore_errors=True)


def _read_from(path: Path, start: int) -> str:
    """What ``path`` holds from byte ``start`` on."""
    return path.read_bytes()[start:].decode(errors="replace")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    runner = Scenarios(tmp_path_factory.mktemp("elastic"))
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def scenario(scenarios, tmp_path):
    """``scenario(name)``: the result of scenario ``name`` of tests/elastic_cluster.py. The
    end of what its process printed is printed here: pytest shows it when the test fails."""

    def run(name: str) -> dict:
        result = scenarios.run(name, tmp_path)
        print(f"--- the end of scenario {name}'s output ---\n{result['log'][-LOG_SHOWN:]}")
        return result

    return run


def changes(result: dict) -> list[dict]:
    """The run's membership changes. A group re-formed with every member (one was late, on
    a machine this busy) is left out: it changes nobody, and the model is checked anyway."""
    return [
        m
        for m in result["metrics"]
        if m.get("event") == "membership" and m.get("change") != "re-formed"
    ]


def one_change(result: dict) -> dict:
    """The run's one membership change. A lost member's replacement may join after it, as
    ``grown``, when it is up before the run ends: after a killed process (not a lost node) it
    starts on the same node at once, and these runs are short. Any other change fails."""
    first, *after = changes(result)
    assert all(m["change"] == "grown" for m in after), changes(result)
    return first


def epochs(result: dict) -> list[dict]:
    return [m for m in result["metrics"] if "epoch" in m]


def assert_fired(result: dict, expected: list[int]) -> None:
    """Each fault fired as many times as ``expected``; if not, the run's error says why."""
    assert result["fired"] == expected, result.get("error") or result["log"][-3000:]


def assert_same_model(result: dict) -> None:
    assert result["error"] is None, result["error"]
    assert result["replicas_equal"], "the replicas differ"
    assert result["diff"] <= 1e-4, f"differs from plain MXNet by {result['diff']:.2e}"


def assert_pinned_as_one_machine(result: dict) -> None:
    """The workers, all on this machine's cores though on different Ray nodes, each run on
    the cores share() gives it among them all: a core of its own when they are as many as
    the cores, else all of them (not a core each per Ray node, which would put ranks of two
    nodes on one core)."""
    assert_on_their_share(result["cores"], set(result["allowed"]))


def test_a_run_starts_with_the_workers_there_and_admits_the_others_as_nodes_come(scenario):
    """``raymodule.workers(1, max_workers=3)`` on a cluster with one worker node: training
    starts with one worker (not waiting for three), two nodes are added, and the workers that
    were asking for them join at step boundaries; the model is the one plain MXNet trains."""
    result = scenario("start_small")
    assert_fired(result, [1])
    assert_same_model(result)
    grown = changes(result)
    assert grown and all(m["change"] == "grown" for m in grown), grown
    assert grown[0]["previous_world_size"] == 1
    assert grown[-1]["world_size"] == 3 and result["world_size"] == 3
    assert "started with 1 of 3 workers; the workers of slots [1, 2] are waiting" in result["log"]
    assert epochs(result)[-1]["world_size"] == 3


def test_with_its_storage_stopped_a_run_goes_on_through_a_lost_worker(scenario):
    """The S3 server SIGSTOPped, then a worker SIGKILLed: the survivors go on, reading no
    storage (the server is resumed by a later step, which a run waiting on it never reaches),
    and the checkpoints written once the server is back are the run's."""
    result = scenario("s3stop")
    assert_fired(result, [1, 1])
    assert result["storage_back"] == ["step"], result["storage_back"]
    assert_same_model(result)
    lost = one_change(result)
    assert lost["world_size"] == 2 and lost["lost"] == ["slot 1"]
    assert epochs(result)[-1]["global_step"] == 32
    assert "ckpt-0000000032" in result["checkpoints"]
    # from the node of worker 0 (a survivor), which made the snapshots, not the driver's; a
    # write that failed there while the server was stopped may have been done from the
    # driver's node, but not those once it was back
    written, workers = result["written_from"], result["worker_nodes"]
    assert set(written[-2:]) == {workers[0]} != {result["driver_node"]}, (written, workers)


def test_checkpoints_a_workers_node_cannot_write_are_written_from_the_drivers(scenario):
    """The worker nodes' S3 keys are wrong, the driver's node's right: each checkpoint's
    files, tried from worker 0's node, are written from the driver's node, said once as a
    warning, and the run is the same."""
    result = scenario("s3keys")
    assert_same_model(result)
    assert result["written_from"] and set(result["written_from"]) == {result["driver_node"]}
    said = [w for w in result["writer_warnings"] if "could not be written" in w]
    assert len(said) == 1, result["writer_warnings"]  # then at INFO
    assert f"from node {result['worker_nodes'][0]}" in said[0], said


def test_a_killed_training_process_resumes_from_storage(scenario):
    """The training process itself SIGKILLed mid-epoch, then run again with the same name."""
    result = scenario("process")
    assert result["first_rc"] == -9
    assert_fired(result, [1])
    assert result["second_rc"] == 0, result["second_log"]
    assert result["diff"] <= 1e-4
    assert [e["epoch"] for e in epochs(result)] == [0, 1]
    assert epochs(result)[-1]["resumed_at_batch"] > 0


# the scenarios of one cluster from here on
def test_a_worker_on_a_drained_node_leaves_at_a_step_boundary_with_no_failure(scenario):
    """Ray's drain API (what an autoscaler's preemption drain calls) on one worker's node: the
    worker leaves at the next step boundary, no step fails, nothing is restored, no failure is
    counted, a checkpoint is committed there, as when a worker is sent SIGTERM, and the model
    is the one plain MXNet trains. The batches come from an iterator the client reads: the
    drain is seen and the worker leaves within one call, whose reply the client reads after
    (it once took no checkpoint then)."""
    result = scenario("drain")
    assert_fired(result, [1])
    assert_same_model(result)
    drained = changes(result)[0]
    assert drained["change"] == "drained" and drained["left"] == ["slot 1"], drained
    assert drained["world_size"] == 2 and drained["failures"] == 0
    assert "slot 1 its node is being drained" in drained["why"]
    assert not any(m["change"] == "lost" for m in changes(result))
    assert epochs(result)[-1]["global_step"] == 32
    # checkpoint_every=0: checkpoints at epoch ends (16, 32), and at the batch boundary after
    # the one where the worker left (the drain comes as step 6 is about to run; the client
    # sends no step ahead: it leaves after step 7)
    steps = [int(name.split("-")[1]) for name in result["checkpoints"]]
    left = drained["step"]
    assert left < 12 and any(left <= step <= left + 4 for step in steps), (left, steps)


def test_the_group_grows_back_when_a_node_returns(scenario):
    """A node removed, then one added: the run goes on with the two survivors (min_workers=2),
    and the lost member's replacement comes up on the new node and joins."""
    result = scenario("grow")
    assert_fired(result, [1, 1])
    assert_same_model(result)
    lost, grown = changes(result)
    assert lost["world_size"] == 2 and lost["lost"] == ["slot 1"]
    assert grown["change"] == "grown" and grown["world_size"] == 3
    assert grown["step"] > lost["step"]
    assert result["world_size"] == 3
    assert epochs(result)[-1]["world_size"] == 3
    # 3 on this machine's 2 cores: all on both (the 2 survivors ran on a core each until then)
    assert_pinned_as_one_machine(result)


def test_below_min_workers_with_no_node_coming_fails_in_words(scenario):
    result = scenario("floor")
    assert_fired(result, [1])
    error = result["error"]
    assert error.startswith("WorkerLostError"), error
    assert "was lost" in error and "min_workers=3" in error and "waiting" in error


@pytest.mark.parametrize("read", ["client", "rows", "callback"])
def test_a_sigterm_below_min_workers_stops_with_a_checkpoint_instead_of_waiting(read, scenario):
    """``floor``, then SIGTERM to the training process (a preemption notice) while the run
    waits for a node that does not come (RAYMODULE_MIN_WORKERS_WAIT_S is 120 s here): the wait
    ends, the two workers there finish the steps in flight, the run checkpoints there and
    fit raises Preempted, as it does with every worker there; started again with the same name
    it would go on from that checkpoint. Batches read in the client (the chunks it sends), or
    rows the workers read (a plan the controller runs); or those rows, with the SIGTERM sent
    by a batch_end_callback that then reads the parameters, a call the controller answers only
    once it stopped waiting. The client asks the run's flag while it waits (the only one with
    batches read in the client) and fit's plan's."""
    result = scenario(f"floor_stop_{read}" if read != "client" else "floor_stop")
    assert_fired(result, [1])
    error = result["error"]
    assert error is not None and error.startswith("Preempted"), error
    assert result["sigterms"] == 1  # handed on once the checkpoint was committed
    (lost,) = changes(result)
    assert lost["change"] == "lost" and lost["world_size"] == 2, lost
    # after the steps in flight (those sent ahead, up to the epoch's end here): before the
    # run's 2 epochs of 16 batches end, after the node's removal at step 6
    epoch, batch = map(int, re.search(r"epoch (\d+), batch (\d+)", error).groups())
    stopped = 16 * epoch + batch
    assert 6 < stopped < 32, error
    assert result["checkpoints"][-1] == f"ckpt-{stopped:010d}", result["checkpoints"]


def test_a_survivor_lost_while_a_replacement_joins_leaves_the_replacement_set_up(scenario):
    result = scenario("admit")
    assert_fired(result, [1, 1, 1])  # armed in the survivor; the node removed; one added
    assert_same_model(result)
    first, second = changes(result)[:2]
    assert first["lost"] == ["slot 1"]
    assert second["lost"] == ["slot 2"] and second["during"] == "applied"


@pytest.mark.parametrize("fault", ["node", "kill"])
def test_a_lost_worker_costs_no_completed_step(fault, scenario):
    """A worker process SIGKILLed, or its node removed for real, at step k: the survivors run
    the failed step again on the same global batch and the run ends as if nothing happened."""
    result = scenario(fault)
    assert_fired(result, [1])
    assert_same_model(result)
    lost = one_change(result)  # one member lost, no other: not even the removed node's peers
    assert lost["world_size"] == 2 and lost["previous_world_size"] == 3
    assert lost["lost"] == ["slot 1"] and "was lost" in lost["why"]
    assert lost["step"] == 6  # the step the fault came at, wherever the client's callbacks were
    assert "world size 3 -> 2" in result["log"]  # the line a user sees
    assert [e["epoch"] for e in epochs(result)] == [0, 1]
    assert epochs(result)[-1]["global_step"] == 32
    assert_pinned_as_one_machine(result)  # 2 survivors (3 with a replacement) on 2 cores
    # a local folder is the driver's machine's: written from its node, not worker 0's
    assert set(result["written_from"]) == {result["driver_node"]} != {result["worker_nodes"][0]}


def test_a_silent_worker_is_removed_after_the_timeout(scenario):
    """A worker SIGSTOPped (alive, not answering) is removed after the collective timeout."""
    result = scenario("hang")
    assert_fired(result, [1])
    assert_same_model(result)
    lost = one_change(result)
    assert "silent" in lost["why"] and lost["world_size"] == 2


def test_with_every_worker_lost_the_run_goes_on_from_its_latest_checkpoint(scenario):
    result = scenario("all")
    assert_fired(result, [1])
    assert_same_model(result)
    assert "restarting them from ckpt-" in result["log"]
    (restart,) = changes(result)
    assert restart["change"] == "restarted" and restart["from_checkpoint"].startswith("ckpt-")
    assert result["world_size"] == 3
    assert [e["epoch"] for e in epochs(result)] == [0, 1]


def test_a_killed_controller_takes_its_workers_and_the_run_goes_on_from_its_checkpoint(scenario):
    result = scenario("controller")
    assert_fired(result, [1])
    assert_same_model(result)
    (restart,) = changes(result)
    assert restart["change"] == "restarted" and "were lost" in restart["why"]
    assert [e["epoch"] for e in epochs(result)] == [0, 1]


def test_a_worker_lost_reading_the_parameters_at_an_epochs_end_is_recovered_from(scenario):
    """Worker 0 dies in the epoch-end get_params (outside the step loop): the read is asked
    again of the new group, and the run ends as the run without the fault."""
    result = scenario("epoch_end")
    assert_same_model(result)
    lost = one_change(result)
    assert lost["lost"] == ["slot 0"] and lost["during"] == "get_params"
    assert lost["during_epoch"] == 0 and lost["step"] == 16  # every step of epoch 0 applied
    assert [e["epoch"] for e in epochs(result)] == [0, 1]
    assert result["epoch_ends"] == [0, 1]  # the callback had each epoch's parameters


@pytest.mark.parametrize("fault", ["reform_kill", "reform_stop"])
def test_a_worker_lost_while_the_group_re_forms_is_recovered_from(fault, scenario):
    """One worker killed at step k; while the group re-forms without it, another dies or stops
    answering (SIGSTOP, bounded by the collective timeout): the recovery starts again without
    both, and the run ends as the run without faults."""
    result = scenario(fault)
    assert_fired(result, [1, 1])  # armed in the one; the other killed
    assert_same_model(result)
    lost = one_change(result)  # one change, with both
    assert lost["lost"] == ["slot 1", "slot 2"] and lost["during"] == "train_step"
    assert lost["failures"] == 2  # the kill, then the loss in the re-form: two events
    if fault == "reform_stop":
        assert "silent: no answer within 4 s while the group re-formed" in lost["why"]


def test_a_worker_sent_sigterm_leaves_at_a_step_boundary_with_a_checkpoint_there(scenario):
    """A preemption notice to one worker mid-epoch, with no failure allowed: it leaves the
    group gracefully at a step boundary (no step fails, nothing is restored, no failure is
    counted), a checkpoint is committed there, and the run ends as the uninterrupted one."""
    result = scenario("sigterm")
    assert_fired(result, [1])
    assert_same_model(result)
    assert result["diff"] <= 1e-5
    left = one_change(result)
    assert left["change"] == "left" and left["left"] == ["slot 1"] and left["failures"] == 0
    assert left["world_size"] == 2 and "lost" not in left
    # checkpoint_every=0: checkpoints at epoch ends, and at the batch boundary after the one
    # where the worker left (the workers run ahead of the callbacks: in these short epochs
    # it is often the epoch's end)
    steps = [int(name.split("-")[1]) for name in result["checkpoints"]]
    assert any(left["step"] <= step <= left["step"] + 4 for step in steps), steps


def test_a_frozen_worker_with_no_failures_allowed_ends_fit_in_words_not_a_hang(scenario):
    result = scenario("frozen")
    assert_fired(result, [1])
    error = result["error"]
    assert error.startswith("WorkerLostError") and "max_failures=0" in error, error
    assert "silent" in error
