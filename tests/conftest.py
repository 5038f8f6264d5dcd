"""One real Ray session on 127.0.0.1 for the whole test run (4 logical CPUs)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

# Ray reads these when it is imported: keep every test on loopback, without auth or telemetry.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# nor Ray's own metrics, which no test reads: every Ray process the tests start (clusters in
# subprocesses, jobs included) inherits this. Exporting them took a cluster's head node agent
# half a core of this machine's two during tests/test_elastic.py (102 s of CPU in 198 s), and
# that file 442 s with them, 387 s without
os.environ.setdefault("RAY_enable_metrics_collection", "0")
_OWN_TMPDIR = None if "RAY_TMPDIR" in os.environ else tempfile.mkdtemp(prefix="rmt-", dir="/tmp")
if _OWN_TMPDIR:  # short: Ray's socket paths must fit in 107 bytes
    os.environ["RAY_TMPDIR"] = _OWN_TMPDIR
    # removed when this process exits: after the session's Ray, and also when no test ran
    # (all deselected) or a script imported these helpers
    atexit.register(shutil.rmtree, _OWN_TMPDIR, ignore_errors=True)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
if "RAYMODULE_MXNET_CACHE_DIR" not in os.environ:
    # MXNet's compiled operator wrappers (raymodule/mxnet_import.py) kept for this session
    # only: its first worker compiles them as on a new machine, and the later ones read them
    _CACHE = tempfile.mkdtemp(prefix="rmc-", dir="/tmp")
    os.environ["RAYMODULE_MXNET_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# the test S3 server's keys, in the usual AWS variables, before Ray starts: every process of
# the session has them, as every process of a cluster has its storage credentials (checkpoint
# files are written by Ray tasks, which see the environment Ray was started with)
os.environ.update(
    AWS_ACCESS_KEY_ID="raymodule-test-access",
    AWS_SECRET_ACCESS_KEY="raymodule-test-secret-0123456789",
    AWS_EC2_METADATA_DISABLED="true",
)

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402

# the local-cluster helper's assertions report like the tests' own
pytest.register_assert_rewrite("localcluster")


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    ray.init(
        num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False
    )
    yield
    ray.shutdown()


def mlp(hidden=(32, 16), classes=10):
    """A model without BatchNorm or Dropout, so replicas and MXNet agree to float rounding."""
    net = mx.sym.Variable("data")
    for i, width in enumerate(hidden):
        net = mx.sym.FullyConnected(net, num_hidden=width, name=f"fc{i}")
        net = mx.sym.Activation(net, act_type="relu", name=f"relu{i}")
    net = mx.sym.FullyConnected(net, num_hidden=classes, name="out")
    return mx.sym.SoftmaxOutput(net, name="softmax")


def lenet(classes=10):
    data = mx.sym.Variable("data")
    net = mx.sym.Convolution(data, kernel=(5, 5), num_filter=6, name="conv0")
    net = mx.sym.Pooling(
        mx.sym.Activation(net, act_type="tanh"), pool_type="max", kernel=(2, 2), stride=(2, 2)
    )
    net = mx.sym.FullyConnected(mx.sym.flatten(net), num_hidden=32, name="fc0")
    net = mx.sym.FullyConnected(
        mx.sym.Activation(net, act_type="tanh"), num_hidden=classes, name="out"
    )
    return mx.sym.SoftmaxOutput(net, name="softmax")


def dataset(n=192, shape=(20,), classes=10, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.uniform(-1, 1, (n,) + shape).astype("float32")
    y = rng.randint(0, classes, n).astype("float32")
    return x, y


def wait_until(done, timeout_s: float, what: str, interval_s: float = 0.01, seen=None):
    """Calls ``done`` every ``interval_s`` until it returns something true, and returns that;
    fails the test saying it waited for ``what`` once ``timeout_s`` passed (a bound on a
    broken run, never a timing the test relies on), with what ``seen()`` gives then."""
    deadline = time.monotonic() + timeout_s
    while not (result := done()):
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"waited {timeout_s:g} s for {what}" + (f": {seen()}" if seen else "")
            )
        time.sleep(interval_s)
    return result


class ClientIter(mx.io.NDArrayIter):
    """An NDArrayIter raymodule reads in the client, as any DataIter (fit reads only a plain
    NDArrayIter as rows): for the tests of that path, whose faults are placed on the steps
    of the chunks the client sends."""


class Interrupted(Exception):
    """Raised by a callback to interrupt ``fit`` (as a killed training process would)."""


def interrupt_at(epoch: int, nbatch: int, run_location: str, pace_s: float = 0.3):
    """A ``batch_end_callback`` that interrupts ``fit`` at (epoch, nbatch) once a checkpoint
    inside that epoch is committed (waiting at most 60 s). Paced by ``pace_s`` per batch: a
    checkpoint due while the one before is still being written is skipped, and writes on a
    busy machine are slow."""
    import raymodule

    def callback(param):
        time.sleep(pace_s)
        if (param.epoch, param.nbatch) != (epoch, nbatch):
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ckpt = raymodule.latest_checkpoint(run_location)
            if ckpt is not None and ckpt.epoch == epoch and ckpt.batch > 0:
                break
            time.sleep(0.1)
        raise Interrupted()

    return callback


def cores_of(pid: int) -> set[frozenset[int]]:
    """The core sets the threads of process ``pid`` may run on (one per distinct set)."""
    found = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            line = next(
                x for x in status.read_text().splitlines() if x.startswith("Cpus_allowed_list")
            )
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        cores = set()
        for part in line.split(":", 1)[1].strip().split(","):
            first, _, last = part.partition("-")
            cores.update(range(int(first), int(last or first) + 1))
        found.add(frozenset(cores))
    return found


def assert_on_their_share(cores: list, allowed: set[int]) -> None:
    """``cores``, each worker's distinct core sets (as :func:`cores_of` gives them, or lists
    of lists): every thread of a worker alike, and the workers on the cores
    :func:`raymodule.worker.cores.share` gives as many workers on ``allowed``."""
    from raymodule.worker.cores import share

    assert all(len(sets) == 1 for sets in cores), cores
    expected = sorted(sorted(share(i, len(cores), allowed)) for i in range(len(cores)))
    assert sorted(sorted(next(iter(sets))) for sets in cores) == expected, cores


def max_relative_diff(expected: dict, actual: dict) -> float:
    """Largest difference over all parameters, relative to each one's largest magnitude."""
    assert sorted(expected) == sorted(actual)
    worst = 0.0
    for name, value in expected.items():
        e, a = value.asnumpy(), actual[name].asnumpy()
        worst = max(worst, float(np.abs(e - a).max() / max(np.abs(e).max(), 1e-12)))
    return worst


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server on 127.0.0.1; its keys are in the usual AWS variables."""
    from s3server import ACCESS_KEY, SECRET_KEY, SeaweedS3

    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == (
        ACCESS_KEY,
        SECRET_KEY,
    ), "tests/conftest.py sets the server's keys before Ray starts"
    server = SeaweedS3().start()
    try:
        yield server
    finally:
        server.stop()
