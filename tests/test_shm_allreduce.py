"""Dense gradients of co-located workers summed through shared memory, on real Ray actors:
the numpy sum on every rank, the same bits everywhere, on one node and on two; a peer killed in
a sum fails the others at once and leaves no segment behind; a machine's workers, as many as
its cores, each run on a core of its own, whichever Ray nodes they are on."""

from __future__ import annotations

import gc
import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
import ray
import stepfaults
from conftest import assert_on_their_share, cores_of, dataset, max_relative_diff, mlp
from shm_ranks import Rank, arrays, check_sums, form

import raymodule
import raymodule.module
from raymodule.worker import ModuleWorker
from raymodule.worker.cores import cores_name, places
from raymodule.worker.shm import LocalGroup, remove_stale_segments, segment_prefix

HERE = Path(__file__).resolve().parent


def segments(pids) -> list[str]:
    """raymodule's shared-memory segments created by ``pids``."""
    return [p for pid in pids for p in glob.glob(f"/dev/shm/raymodule-{pid}-*")]


@pytest.fixture
def ranks(request):
    made = []

    def start(n: int) -> list:
        made.extend(Rank.remote() for _ in range(n))
        return made[-n:]

    yield start
    for r in made:
        ray.kill(r)


@pytest.mark.parametrize("same_node", [False, True], ids=["store", "same-node"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sums_equal_numpy_and_agree_bit_for_bit_on_one_node(ranks, world_size, same_node):
    group = ranks(world_size)
    form(group, same_node)
    assert ray.get([r.local_ranks.remote() for r in group]) == [world_size] * world_size
    # many buckets first, then one bucket larger than any of them: the segment grows
    for step, bucket_bytes in enumerate((64, 1 << 20, 64)):
        check_sums(group, bucket_bytes, seed=step)
    # read where they were summed, twice (the second sums through the same arrays), then
    # summed in place again, in many buckets, where the first were read
    for seed in (3, 4):
        check_sums(group, 1 << 20, seed=seed, shared=True)
    check_sums(group, 64, seed=5)
    # one node: all of the time in shared memory, none on gloo
    tiers = ray.get([r.tier_s.remote() for r in group], timeout=60)
    assert all(t["shared memory"] > 0 and t["gloo"] == 0 for t in tiers), tiers
    # met in shared memory: no rank imported torch (seconds of CPU each)
    loaded = ray.get([r.loaded.remote("torch") for r in group], timeout=60)
    assert loaded == [not same_node] * world_size
    ray.get([r.close.remote() for r in group], timeout=60)
    ray.get([r.close.remote() for r in group], timeout=60)  # idempotent
    assert segments(ray.get([r.pid.remote() for r in group])) == []


@pytest.mark.parametrize("same_node", [False, True], ids=["store", "same-node"])
def test_a_peer_killed_in_a_sum_fails_the_others_at_once_and_leaks_no_segment(ranks, same_node):
    group = ranks(3)
    pids = ray.get([r.pid.remote() for r in group])
    form(group, same_node)  # timeout 60 s
    check_sums(group, 64)
    ray.get(group[2].set_death.remote(2))
    calls = [r.reduce.remote(p, 64) for r, p in zip(group, arrays(3))]
    for call in calls[:2]:
        with pytest.raises(ray.exceptions.RayTaskError, match=f"pid {pids[2]}.* died"):
            ray.get(call, timeout=15)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(calls[2], timeout=15)
    ray.get([r.close.remote() for r in group[:2]], timeout=60)
    assert segments(pids) == []
    # the survivors form a new group in the same processes
    form(group[:2], same_node)
    check_sums(group[:2], 1 << 20)
    ray.get([r.close.remote() for r in group[:2]], timeout=60)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_an_update_split_in_parts_is_shared_and_a_lost_peers_part_left_to_the_others(
    ranks, world_size
):
    """Each rank updates its part of arrays laid out as the gradients (odd sizes) from its
    part of the sum, and every rank ends with the whole update, the same bits as numpy's.
    Then the last rank dies once its part is updated, before it shares it: the others raise
    PartlyUpdated within seconds, each with only its own part updated and the whole sum
    (added from the ranks' slots) to update the rest with; no segment is left."""
    group = ranks(world_size)
    pids = ray.get([r.pid.remote() for r in group])
    form(group, same_node=True)
    parts = arrays(world_size)
    weights = arrays(1, seed=5)[0]
    expected = [parts[0][k].copy() for k in range(len(weights))]
    for k in range(len(weights)):
        for p in parts[1:]:  # added in rank order, as the ranks add
            expected[k] += p[k]
    results = ray.get(
        [r.reduce_and_update.remote(p, weights) for r, p in zip(group, parts)], timeout=120
    )
    for lost, updated, _ in results:  # the sum itself: only a rank's own part is kept
        assert lost is None
        for k, w in enumerate(weights):
            assert updated[k].tobytes() == (w - expected[k]).tobytes()
    calls = [
        r.reduce_and_update.remote(p, weights, die=i == world_size - 1)
        for i, (r, p) in enumerate(zip(group, parts))
    ]
    count = sum(w.size for w in weights)
    for i, call in enumerate(calls[:-1]):
        lost, updated, sums = ray.get(call, timeout=15)
        assert lost == (count * i // world_size, count * (i + 1) // world_size)
        flat = np.concatenate([u.reshape(-1) for u in updated])
        start = np.concatenate([w.reshape(-1) for w in weights])
        summed = np.concatenate([e.reshape(-1) for e in expected])
        lo, hi = lost
        assert flat[lo:hi].tobytes() == (start - summed)[lo:hi].tobytes()
        assert np.array_equal(np.delete(flat, np.s_[lo:hi]), np.delete(start, np.s_[lo:hi]))
        for k in range(len(weights)):
            assert sums[k].tobytes() == expected[k].tobytes()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(calls[-1], timeout=15)
    ray.get([r.close.remote() for r in group[:-1]], timeout=60)
    assert segments(pids) == []


def test_sums_across_two_nodes_go_through_each_nodes_leader_and_workers_pin_by_machine(tmp_path):
    """tests/shm_ranks.py on a two-node cluster on this machine: the sums of four ranks, two a
    node, a leader lost in a sum (no shared memory left behind), then raymodule workers, two
    a node, training the model of one native device (within 1e-5), pinned as four on this
    machine's cores (not as two a node)."""
    ray_tmp = tempfile.mkdtemp(prefix="rshm-", dir="/tmp")  # short: Ray's socket paths
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "shm_ranks.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_a_rank_lets_mxnet_finish_reading_the_shared_sums_before_they_are_summed_again(ranks):
    """The sums ``Collective.reduce_shared`` leaves in the shared memory are read there by
    MXNet's kernels, which may still be queued when the rank returns: its next call on the
    group waits for them (``MXNDArrayWaitToWrite``) before the ranks overwrite the sums. Rank
    0's kernels here are held back a second; they must read the first sums, not the second.
    (Should the second sum take longer than that second, they would read the first sums even
    without the wait: the test cannot fail wrongly, only miss.)"""
    group = ranks(2)
    form(group, same_node=True)
    first = arrays(2, seed=0)
    ray.get(
        [
            group[0].read_sums_late.remote(first[0], 1 << 20, 1.0),
            group[1].reduce.remote(first[1], 1 << 20, True),
        ],
        timeout=120,
    )
    check_sums(group, 1 << 20, seed=1, shared=True)  # the next sum, into the same memory
    late = ray.get(group[0].late_reading.remote(), timeout=120)
    for read, mine, theirs in zip(late, *first):
        np.testing.assert_array_equal(read, mine + theirs)


def descriptors(of: Callable[[str], bool]) -> int:
    """This process's open descriptors whose target ``of`` accepts."""
    fds = [os.path.join("/proc/self/fd", fd) for fd in os.listdir("/proc/self/fd")]
    return sum(of(os.path.realpath(fd)) for fd in fds)


def shm_descriptors() -> int:
    """This process's open descriptors of raymodule's shared-memory segments."""
    return descriptors(lambda target: "/dev/shm/raymodule-" in target)


def test_a_segment_outgrown_while_an_array_reads_its_sum_stays_mapped_until_the_array_goes(
    monkeypatch,
):
    """MXNet arrays over a sum left in the shared memory (``copy_out=False``, as
    ``Collective.reduce_shared`` reads it) keep the segment mapped when the group moves to a
    bigger one, or closes: they still read the sum, no descriptor is left open once they
    go, and nothing complains when the segment is let go."""
    complaints = []
    monkeypatch.setattr(sys, "unraisablehook", complaints.append)
    base = shm_descriptors()
    group = LocalGroup([0], [os.getpid()], 0, timeout_s=10)  # a node group of one rank
    try:
        group.reserve(64)
        flat = group.sum([np.arange(16, dtype="f")], np.float32, copy_out=False)
        held = mx.nd.from_numpy(flat[:16].reshape(4, 4))
        del flat
        group.reserve(1 << 16)  # the first data segment released while `held` reads it
        np.testing.assert_array_equal(held.asnumpy().ravel(), np.arange(16, dtype="f"))
        flat = group.sum([np.ones(16, dtype="f")], np.float32, copy_out=False)
        held = mx.nd.from_numpy(flat[:16].reshape(4, 4))
        del flat
    finally:
        group.close()
    assert held.sum().asscalar() == 16
    del held
    gc.collect()
    assert shm_descriptors() == base  # each mapping's own descriptor closed with it
    assert complaints == []
    assert segments([os.getpid()]) == []


def pidfds() -> int:
    """This process's open pidfds (a node group watches its peers through them)."""
    return descriptors(lambda target: target.endswith("[pidfd]"))


def test_a_node_group_that_fails_to_form_keeps_no_descriptor_or_segment():
    """A rank whose group does not form (its leader made no shared memory; its peer never
    attached) raises within the timeout, and lets go of its peers' pidfds and its segments."""
    peer = subprocess.Popen(["sleep", "60"])  # a live process that never joins
    try:
        base = pidfds()
        with pytest.raises(TimeoutError, match="made no shared memory"):
            LocalGroup([0, 1], [peer.pid, os.getpid()], 1, timeout_s=0.3, token="nope")
        assert pidfds() == base
        with pytest.raises(TimeoutError, match="no shared-memory barrier"):
            LocalGroup([0, 1], [os.getpid(), peer.pid], 0, timeout_s=0.3)
        assert pidfds() == base
        assert segments([os.getpid()]) == []
    finally:
        peer.kill()
        peer.wait()


def test_shared_memory_beyond_what_dev_shm_holds_fails_the_sum_with_a_clear_error():
    """A segment ``/dev/shm`` cannot hold is refused when it is made (Linux backs a tmpfs
    file's pages only when they are first written, and would kill the process with SIGBUS
    there): the error says what to change, and no segment is left."""
    fs = os.statvfs("/dev/shm")
    group = LocalGroup([0], [os.getpid()], 0, timeout_s=10)
    try:
        with pytest.raises(OSError, match="/dev/shm has no room .* --shm-size"):
            group.reserve(fs.f_blocks * fs.f_frsize + (1 << 30))
        assert segments([os.getpid()]) == []
    finally:
        group.close()


def test_a_reserve_that_comes_after_close_makes_no_segment():
    """A sum's first call, taken up by the group's thread just before the group closed, runs
    after close(): it raises, and leaves no segment behind (before, the leader made one and
    then failed before it could unlink it: it stayed until the worker's process ended)."""
    group = LocalGroup([0], [os.getpid()], 0, timeout_s=10)
    group.close()
    with pytest.raises(RuntimeError, match="shared-memory group is closed"):
        group.reserve(4096)
    assert segments([os.getpid()]) == []


def test_segments_of_dead_creators_are_removed_and_others_kept():
    """A creator is a pid and its start time: a segment of a dead creator whose pid now
    belongs to another process (this one, started at another time) is removed too."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = segment_prefix(os.getpid(), "0a1b") + "1"
    started = int(alive.split("-")[2])
    dead = f"raymodule-{gone.pid}-{started}-0a1b-1"
    reused = f"raymodule-{os.getpid()}-{started - 1}-0a1b-1"  # this pid, an earlier process
    names = (dead, reused, alive)
    for name in names:
        Path("/dev/shm", name).touch()
    try:
        removed = remove_stale_segments()  # and any other stale one there may be
        assert dead in removed and reused in removed and alive not in removed
        assert [Path("/dev/shm", name).exists() for name in names] == [False, False, True]
    finally:
        for name in names:
            Path("/dev/shm", name).unlink(missing_ok=True)


def test_a_rank_meeting_by_name_waits_for_the_leaders_segment_to_be_sized():
    """The leader makes its control segment in two steps (shm_open, then ftruncate); a rank
    that finds it by name (a SameNode group) in between waits instead of failing on an
    empty file, which left the leader waiting out the collective timeout."""
    token = secrets.token_hex(4)
    path = Path("/dev/shm", segment_prefix(os.getpid(), token) + "1")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)  # created, not sized yet
    joined: dict = {}

    def join():
        try:
            joined["group"] = LocalGroup([0, 1], [os.getpid()] * 2, 1, 10.0, token=token)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            joined["error"] = err

    try:
        rank = threading.Thread(target=join)
        rank.start()
        time.sleep(0.3)
        assert rank.is_alive() and not joined, joined  # waiting, not failed
        os.ftruncate(fd, 4096)  # the leader sized it
        rank.join(timeout=10)
        assert "group" in joined, joined
        joined["group"].close()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def test_a_nodes_workers_each_run_on_a_core_of_their_own_and_a_lone_survivor_on_all(
    tmp_path, monkeypatch
):
    """Two workers of one group on this node, as many as the cores they may run on (this
    2-core machine's; on a larger one, share() says they share them all): every thread of
    each on its own core while both train; after worker 1 dies, the survivor, a group of one,
    runs on all of them again."""
    allowed = set(os.sched_getaffinity(0))
    marks = tmp_path / "marks"
    marks.mkdir()
    seen: dict = {}

    def look():
        for up in marks.glob("up-*"):
            pid = int(up.name.split("-")[1])
            seen[pid] = cores_of(pid)

    plan = {(3, None): ("gate", "look"), (5, 1): "die"}
    # the first look for replacements sets the next an hour later: none joins the survivor
    monkeypatch.setenv("RAYMODULE_ADMIT_INTERVAL_S", "3600")
    cls = stepfaults.worker_class(plan, marks=marks)
    monkeypatch.setattr(raymodule.module, "ControllerHandle", stepfaults.with_workers(cls))
    x, y = dataset(n=256)
    run = raymodule.RunConfig(name="pin", storage=str(tmp_path), min_workers=1)
    with stepfaults.Gates(marks, {"look": look}) as gates:
        with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
            mod.fit(
                mx.io.NDArrayIter(x, y, 16),
                num_epoch=1,
                optimizer_params={"learning_rate": 0.1},
                run=run,
            )
            survivor = mod.workers.nodes[0]["pid"]
            assert mod.world_size == 1
            after = cores_of(survivor)
    assert gates.errors == [] and gates.fired == {"look": 1}
    assert len(seen) == 2, seen
    assert_on_their_share(list(seen.values()), allowed)
    assert after == {frozenset(allowed)}, after


@pytest.mark.parametrize(
    "workers, fault, applied, words",
    [
        (2, "raise", 3, "a bad batch at step 3"),
        (2, ("arm", "rows", "raise"), 4, "rows unreadable after step 4"),
        (1, "raise", 3, "a bad batch at step 3"),
    ],
    ids=["in-a-step", "reading-rows", "alone"],
)
def test_a_workers_own_error_in_a_step_breaks_its_group_which_re_forms_with_every_member(
    workers, fault, applied, words, tmp_path, monkeypatch
):
    """A worker whose training step raises (its data, say), or that cannot read the rows of a
    call's steps, leaves the group: its peer, waiting at that step's sum, fails at once rather
    than after the collective timeout, and never sums a later step of that worker's with the
    step it waits in. The error is the caller's, and fit stops at it as native MXNet's does:
    the steps before it applied, none after. The group re-forms at once with both workers, so
    the module goes on: it gives its parameters and trains again (the fault fires once), and
    ends with the model of native MXNet stopped at the same batch and trained on. Before, the
    next call said the module could not go on, and its parameters were lost; and a worker
    whose rows could not be read stayed in the group, its next call's step summed with its
    peer's step before. A lone worker, with no group to break, applies none of the steps of
    its calls behind the one that failed either (two calls of two steps in flight); before,
    it applied them, and stood up to four steps past the error."""
    monkeypatch.setenv("RAYMODULE_COLLECTIVE_TIMEOUT_S", "120")
    monkeypatch.setenv("RAYMODULE_STEPS_PER_CALL", "2")  # rows read at steps 2, 4, ...
    cls = stepfaults.worker_class({(3, workers - 1): fault}, marks=tmp_path)
    monkeypatch.setattr(raymodule.module, "ControllerHandle", stepfaults.with_workers(cls))
    x, y = dataset(n=256)
    symbol = mlp()
    sgd = {"learning_rate": 0.1}
    mx.random.seed(5)
    native = mx.mod.Module(symbol)
    native.bind([("data", (16, 20))], [("softmax_label", (16,))])
    native.init_params(mx.init.Xavier())
    start = [{k: v.copy() for k, v in params.items()} for params in native.get_params()]
    native.init_optimizer(optimizer_params=sgd)
    expected = []
    for batches in (applied, 16):  # up to the failed step, then an epoch
        for batch in list(mx.io.NDArrayIter(x, y, 16))[:batches]:
            native.forward_backward(batch)
            native.update()
        expected.append({k: v.copy() for k, v in native.get_params()[0].items()})
    with raymodule.Module(symbol, context=[mx.cpu(i) for i in range(workers)]) as mod:
        train = mx.io.NDArrayIter(x, y, 16)
        mod.bind(train.provide_data, train.provide_label)
        generation = mod.workers.generation
        with pytest.raises(
            raymodule.WorkerError, match=f"worker {workers - 1} failed in train_step.*{words}"
        ):
            mod.fit(
                train,
                num_epoch=1,
                arg_params=start[0],
                aux_params=start[1],
                optimizer_params=sgd,
            )
        # the error brought the view: per-worker calls (a forward's) are for the new group
        assert (mod.world_size, mod.workers.generation) == (workers, generation + 1)
        stopped = {k: v.copy() for k, v in mod.get_params()[0].items()}  # updated in place
        mod.fit(mx.io.NDArrayIter(x, y, 16), num_epoch=1, optimizer_params=sgd)
        trained = mod.get_params()[0]
    assert max_relative_diff(expected[0], stopped) <= 1e-5
    assert max_relative_diff(expected[1], trained) <= 1e-5


def test_workers_on_a_machine_other_than_x86_64_sum_over_gloo_not_shared_memory(monkeypatch):
    """The shared memory's barriers rely on x86-64's store order (a rank's bucket seen by its
    peers before its arrival at the barrier); another machine (aarch64, as ``platform.machine()``
    says in these workers) may show them out of order. Its workers say so, meet at a gloo store
    instead of in shared memory, and sum over gloo: fit ends on native MXNet's model, and no
    segment is made. Before, they summed through shared memory whatever the machine."""

    class OnArm(ModuleWorker):
        def __init__(self, *args):
            import platform

            platform.machine = lambda: "aarch64"
            super().__init__(*args)

        def summed_in(self) -> list[str]:
            """The tiers this worker's sums took time in."""
            return sorted(tier for tier, s in self._collective.tier_s.items() if s > 0)

    monkeypatch.setattr(raymodule.module, "ControllerHandle", stepfaults.with_workers(OnArm))
    x, y = dataset(n=256)
    sgd = {"learning_rate": 0.1}
    native = mx.mod.Module(mlp())
    native.bind([("data", (32, 20))], [("softmax_label", (32,))])
    native.init_params(mx.init.Xavier())
    start = [{k: v.copy() for k, v in params.items()} for params in native.get_params()]
    native.fit(mx.io.NDArrayIter(x, y, 32), num_epoch=1, optimizer_params=sgd)
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.fit(
            mx.io.NDArrayIter(x, y, 32),
            num_epoch=1,
            arg_params=start[0],
            aux_params=start[1],
            optimizer_params=sgd,
        )
        assert [n["shared_memory"] for n in mod.workers.nodes] == [False, False]
        assert mod.workers.call("summed_in") == [["gloo"], ["gloo"]]
        assert segments([n["pid"] for n in mod.workers.nodes]) == []
        assert max_relative_diff(native.get_params()[0], mod.get_params()[0]) <= 1e-5


def test_workers_are_placed_among_those_on_the_same_cores_whatever_their_ray_node():
    """Pinning counts a group's workers by the cores they may run on, named machine-wide (two
    Ray nodes on one machine share its cores); a worker whose cores are unknown is alone."""
    here = cores_name(os.sched_getaffinity(0))
    assert here == f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}:" + ",".join(
        map(str, sorted(os.sched_getaffinity(0)))
    )
    assert cores_name(set()) is None
    other = "another-machine:0,1"
    assert places([here, here, other, here, None, other]) == [
        (0, 3), (1, 3), (0, 2), (2, 3), (0, 1), (1, 2),
    ]  # fmt: skip


def test_a_worker_lost_before_it_shares_its_part_of_the_update_costs_no_step(tmp_path, monkeypatch):
    """Three workers of one node split the update; worker 1 dies once it updated its part of
    the weights and momentum, before it shared it. The survivors update that part themselves
    from the sum they hold, so the step is applied, and the run ends with the model of the run
    without the kill (to 1e-5: two workers add in another order from then on), with nothing
    left in shared memory. Were the survivors to go on from their torn state (their own part
    a step ahead of the rest), the model would differ by a learning-rate step."""
    x, y = dataset(n=240)
    symbol = mlp()
    mx.random.seed(11)
    native = mx.mod.Module(symbol)
    native.bind([("data", (24, 20))], [("softmax_label", (24,))])
    native.init_params(mx.init.Xavier())
    start = native.get_params()
    monkeypatch.setenv("RAYMODULE_ADMIT_INTERVAL_S", "3600")  # no replacement joins
    monkeypatch.setenv("RAYMODULE_SPLIT_UPDATE", "1")
    models, pids = {}, []
    for plan in ({}, {(6, 1): ("arm", "share", "die")}):
        marks = tmp_path / f"marks-{len(plan)}"
        marks.mkdir()
        cls = stepfaults.worker_class(plan, marks=marks)
        monkeypatch.setattr(raymodule.module, "ControllerHandle", stepfaults.with_workers(cls))
        run = raymodule.RunConfig(storage=str(tmp_path / f"run-{len(plan)}"), min_workers=2)
        with raymodule.Module(symbol, context=[mx.cpu(i) for i in range(3)]) as mod:
            mod.fit(
                mx.io.NDArrayIter(x, y, 24),
                num_epoch=2,
                arg_params=start[0],
                aux_params=start[1],
                optimizer_params={"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4},
                run=run,
            )
            models[len(plan)] = {k: v.copy() for k, v in mod.get_params()[0].items()}
            world_size = mod.world_size
        assert stepfaults.split_updates(marks) == 3
        pids += [int(up.name.split("-")[1]) for up in marks.glob("up-*")]
    assert stepfaults.fired(marks, 6, 1)
    assert world_size == 2
    assert max_relative_diff(models[0], models[1]) < 1e-5
    assert segments(pids) == []
