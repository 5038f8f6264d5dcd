"""Dense gradients of co-located workers summed through shared memory, on real Ray actors:
the numpy sum on every rank, the same bits everywhere, on one node and on two; a peer killed in
a sum fails the others at once and leaves no segment behind."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
from shm_ranks import Rank, arrays, check_sums, form

from raymodule.worker.shm import LocalGroup, remove_stale_segments

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


def test_sums_across_two_nodes_go_through_each_nodes_leader(tmp_path):
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


def test_segments_of_dead_creators_are_removed_and_others_kept():
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, alive = f"raymodule-{gone.pid}-0a1b-1", f"raymodule-{os.getpid()}-0a1b-1"
    for name in (dead, alive):
        Path("/dev/shm", name).touch()
    try:
        assert dead in remove_stale_segments()
        assert not Path("/dev/shm", dead).exists() and Path("/dev/shm", alive).exists()
    finally:
        for name in (dead, alive):
            Path("/dev/shm", name).unlink(missing_ok=True)


def test_a_rank_meeting_by_name_waits_for_the_leaders_segment_to_be_sized():
    """The leader makes its control segment in two steps (shm_open, then ftruncate); a rank
    that finds it by name (a SameNode group) in between waits instead of failing on an
    empty file, which left the leader waiting out the collective timeout."""
    token = secrets.token_hex(4)
    path = Path("/dev/shm", f"raymodule-{os.getpid()}-{token}-1")
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
