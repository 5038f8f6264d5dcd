"""Ranks of a real gloo group for the shared-memory allreduce tests, and a two-node run of them.

    python tests/shm_ranks.py

Starts a ``ray.cluster_utils.Cluster`` as tests/elastic_cluster.py does (a head without CPUs and
two nodes), places four ranks two per node (ranks 0 and 2 on one, 1 and 3 on the other, so
the node leaders are ranks 0 and 1), sums arrays of odd sizes through ``Collective.reduce``
in one bucket and in many, and fails unless every rank got the numpy sum, all the same bits.
Then SIGKILLs the other node's leader (rank 1) in a sum: rank 0 fails in gloo and breaks its
node's group, so rank 2 fails too, and rank 3 sees its leader die; each within seconds (the
timeout is 60 s), and no rank's shared memory is left behind. Last, ``raymodule.Module`` fits
on the same two nodes with two workers each, and fails unless it trains the model one native
MXNet device trains on the same data and seed (parameters within 1e-5, the same metric) and
each worker runs on the cores its place among all four gives it: the two nodes share this
machine's cores (on 2 cores: both, for every worker; pinned per node, each node's first
worker would be on core 0). Stops every Ray process it started.
"""

from __future__ import annotations

import glob
import os
import secrets
import sys
import threading
import time

# Ray on loopback, when this file is run by hand (two_nodes' cluster): read as ray is imported
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import mxnet as mx
import numpy as np
import ray

from raymodule.worker.collective import Collective, free_address
from raymodule.worker.shm import SameNode

SIZES = (1, 7, 1001)
BUCKETS = (1 << 20, 64, 1 << 20)  # bucket bytes of the sums on two nodes: one bucket, many
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


@ray.remote(num_cpus=0)
class Rank:
    """One rank of a real group, reducing arrays as a worker's update does; ``die_at`` makes
    its call of that number SIGKILL its own process instead of reducing."""

    def __init__(self):
        self.collective = None
        self.calls = 0
        self.die_at = None

    def pid(self) -> int:
        return os.getpid()

    def address(self) -> str:
        return free_address()

    def join(self, world_size: int, rank: int, rendezvous, timeout_s: float = 60) -> None:
        self.collective = Collective(world_size, rank, rendezvous, "gloo", timeout_s)
        self.calls = 0

    def loaded(self, module: str) -> bool:
        """Whether this rank's process imported ``module``."""
        return module in sys.modules

    def local_ranks(self) -> int:
        """How many ranks of the group share this rank's node (and its shared memory)."""
        return self.collective._local.size

    def tier_s(self) -> dict:
        """Seconds this rank's sums spent per tier (shared memory, gloo)."""
        return dict(self.collective.tier_s)

    def set_death(self, call: int) -> None:
        self.die_at = call

    def reduce(self, arrays: list[np.ndarray], bucket_bytes: int, shared: bool = False) -> list:
        """The sums of ``arrays``: summed in place (``Collective.reduce``), or with ``shared``
        read where they were summed (``Collective.reduce_shared``, after checking that it
        may, and that it left the arrays as they were)."""
        self.calls += 1
        if self.calls == self.die_at:
            os.kill(os.getpid(), 9)
        grads = [mx.nd.array(a, dtype=a.dtype) for a in arrays]
        if not shared:
            self.collective.reduce(grads, bucket_bytes)
            return [g.asnumpy() for g in grads]
        assert self.collective.shares_sums(grads, bucket_bytes)
        sums = [s.asnumpy() for s in self.collective.reduce_shared(grads)]
        for grad, before in zip(grads, arrays):
            np.testing.assert_array_equal(grad.asnumpy(), before)
        return sums

    def read_sums_late(self, arrays: list[np.ndarray], bucket_bytes: int, after_s: float) -> None:
        """Sums ``arrays`` as :meth:`reduce` with ``shared`` does, and has MXNet read the sums,
        where they were summed, through kernels held back ``after_s`` seconds (a custom
        operator waiting for a timer), as an update's kernels still queued would; what they
        read comes from :meth:`late_reading`."""
        _register_held()
        grads = [mx.nd.array(a, dtype=a.dtype) for a in arrays]
        assert self.collective.shares_sums(grads, bucket_bytes)
        key = secrets.token_hex(4)
        _RELEASES[key] = threading.Event()
        self.late = [
            mx.nd.Custom(s, op_type="raymodule_test_held", release=key)
            for s in self.collective.reduce_shared(grads)
        ]
        threading.Timer(after_s, _RELEASES[key].set).start()

    def late_reading(self) -> list[np.ndarray]:
        return [a.asnumpy() for a in self.late]

    def reduce_and_update(self, arrays, weights, die: bool = False):
        """Sums ``arrays`` and updates ``weights`` (shaped as them) in parts: each rank takes
        its part of the sum from its part of the weights, and the ranks share the parts;
        ``die`` SIGKILLs this process once its part is updated, before it shares it, and once
        every other rank has updated its own part and waits at the barrier after. Returns
        ``(lost, weights, sums)``: ``lost``, if a peer was lost after every rank's arrays were
        in, is this rank's part ``(lo, hi)``, its only part updated; else None."""
        from raymodule.worker.native import host_views
        from raymodule.worker.shm import PartlyUpdated, _pieces

        grads = [mx.nd.array(a, dtype=a.dtype) for a in arrays]
        sums = host_views(grads)
        weights = [w.copy() for w in weights]

        def update(lo: int, hi: int) -> None:
            for (w, _), (g, _) in zip(_pieces(weights, lo, hi), _pieces(sums, lo, hi)):
                w -= g
            if die:
                # With more ranks than cores, a rank the kernel has not run since the barrier
                # before would find the group broken there, not past it: it fails without its
                # part updated, as sum_and_update says (the recovery brings it to the step
                # the others applied). Here every other rank is past it when this one dies.
                local = self.collective._local
                deadline = time.monotonic() + 60
                while np.delete(local._seqs, local.index).min() <= local._seq:
                    assert time.monotonic() < deadline, "the other ranks never reached the barrier"
                    time.sleep(0.001)
                os.kill(os.getpid(), 9)

        lost = None
        try:
            self.collective.reduce_and_update(grads, update, [weights])
        except PartlyUpdated as err:
            lost = (err.lo, err.hi)
        return lost, weights, [g.asnumpy() for g in grads]

    def close(self) -> None:
        self.collective.close()


_RELEASES: dict[str, threading.Event] = {}  # a held kernel's release, by the key it is given


class _Held(mx.operator.CustomOp):
    """Copies its input once its release is set: an MXNet kernel reading an array, held back."""

    def __init__(self, release: str):
        self.release = release

    def forward(self, is_train, req, in_data, out_data, aux):
        _RELEASES[self.release].wait(60)
        self.assign(out_data[0], req[0], in_data[0].copy())

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        raise NotImplementedError


def _register_held() -> None:
    """Registers ``raymodule_test_held`` in this process (custom operators are per process)."""
    if getattr(_register_held, "done", False):
        return

    @mx.operator.register("raymodule_test_held")
    class HeldProp(mx.operator.CustomOpProp):
        def __init__(self, release):  # MXNet gives a custom operator's arguments as strings
            super().__init__(need_top_grad=False)
            self.release = release

        def infer_shape(self, in_shape):
            return in_shape, [in_shape[0]], []

        def infer_type(self, in_type):
            return in_type, [in_type[0]], []

        def create_operator(self, ctx, shapes, dtypes):
            return _Held(self.release)

    _register_held.done = True


def arrays(world_size: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Each rank's gradients: float32 arrays of ``SIZES`` elements (and one 2-D)."""
    rng = np.random.RandomState(seed)
    return [
        [rng.uniform(-1, 1, n).astype("f") for n in SIZES] + [rng.normal(size=(13, 5)).astype("f")]
        for _ in range(world_size)
    ]


def form(ranks: list, same_node: bool = False) -> None:
    """Forms a group of ``ranks``: at rank 0's store, or (``same_node``: they all run on this
    node) in shared memory, as the controller forms one node's workers."""
    if same_node:
        pids = ray.get([r.pid.remote() for r in ranks], timeout=60)
        rendezvous = SameNode(tuple(pids), secrets.token_hex(4))
    else:
        rendezvous = ray.get(ranks[0].address.remote(), timeout=60)
    ray.get([r.join.remote(len(ranks), i, rendezvous) for i, r in enumerate(ranks)], timeout=120)


def check_sums(ranks: list, bucket_bytes: int, seed: int = 0, nodes=None, shared=False) -> None:
    """Reduces each rank's arrays (``shared``: see :meth:`Rank.reduce`); asserts every rank got
    bit for bit the same sum, and that it is the numpy sum added in the group's order: each
    node's ranks in rank order, then the nodes' sums (``nodes``: the ranks of each node; one
    node if not given). Two node sums add the same in either order, so with up to two nodes
    the bits are known."""
    parts = arrays(len(ranks), seed)
    results = ray.get(
        [r.reduce.remote(p, bucket_bytes, shared) for r, p in zip(ranks, parts)], timeout=120
    )
    for k in range(len(parts[0])):
        node_sums = []
        for node in nodes or [range(len(ranks))]:
            summed = parts[node[0]][k].copy()
            for r in node[1:]:
                summed += parts[r][k]
            node_sums.append(summed)
        expected = sum(node_sums[1:], node_sums[0])
        for result in results:
            np.testing.assert_array_equal(result[k], expected)
            assert result[k].tobytes() == results[0][k].tobytes()


def two_nodes() -> None:
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        ranks = [
            Rank.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % 2].node_id, soft=False)
            ).remote()
            for i in range(4)
        ]
        form(ranks)
        assert ray.get([r.local_ranks.remote() for r in ranks]) == [2] * 4
        pids = ray.get([r.pid.remote() for r in ranks])
        for step, bucket_bytes in enumerate(BUCKETS):
            check_sums(ranks, bucket_bytes, seed=step, nodes=[[0, 2], [1, 3]])
        # the sums read where the nodes' ranks summed them, the leaders' across nodes included
        check_sums(ranks, 1 << 20, seed=7, nodes=[[0, 2], [1, 3]], shared=True)
        # every rank spent time in its node's sum; only the leaders (0, 1) spent any on gloo
        tiers = ray.get([r.tier_s.remote() for r in ranks], timeout=60)
        assert all(t["shared memory"] > 0 for t in tiers), tiers
        assert [t["gloo"] > 0 for t in tiers] == [True, True, False, False], tiers
        ray.get(ranks[1].set_death.remote(len(BUCKETS) + 2))  # its next call
        calls = [r.reduce.remote(p, 64) for r, p in zip(ranks, arrays(4))]
        for rank in (0, 2, 3):
            try:
                ray.get(calls[rank], timeout=30)
            except ray.exceptions.RayTaskError as err:
                print(f"rank {rank}: {str(err).splitlines()[-1]}")
            else:
                raise AssertionError(f"rank {rank} summed without rank 1")
        ray.get([ranks[r].close.remote() for r in (0, 2, 3)], timeout=60)
        left = [p for pid in pids for p in glob.glob(f"/dev/shm/raymodule-{pid}-*")]
        assert left == [], f"shared memory left behind: {left}"
        workers_by_machine()
    finally:
        ray.shutdown()
        cluster.shutdown()


def workers_by_machine() -> None:
    """A fit on the cluster's two nodes, two workers each, its sums through each node's shared
    memory and between the nodes' leaders over gloo: the model of one native MXNet device on
    the same batches and seed (within 1e-5), and all four workers on this machine's cores,
    each on those :func:`~raymodule.worker.cores.share` gives it among the four."""
    from conftest import assert_on_their_share, cores_of, dataset, max_relative_diff, mlp

    import raymodule

    x, y = dataset(n=96)

    def fit(mod):
        mx.random.seed(3)
        metric = mx.metric.Accuracy()
        mod.fit(
            mx.io.NDArrayIter(x, y, 16),
            eval_metric=metric,
            num_epoch=2,
            optimizer="sgd",
            optimizer_params={"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4},
            initializer=mx.init.Xavier(),
        )
        return mod.get_params()[0], metric.get()

    native_params, native_metric = fit(mx.mod.Module(mlp()))
    with raymodule.Module(mlp(), context=[mx.cpu(i) for i in range(4)]) as mod:
        params, metric = fit(mod)
        where = mod.workers.nodes
        seen = [cores_of(place["pid"]) for place in where]
    assert len({place["node"] for place in where}) == 2, where
    assert max_relative_diff(native_params, params) < 1e-5
    assert metric == native_metric, (metric, native_metric)
    assert_on_their_share(seen, set(os.sched_getaffinity(0)))


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    two_nodes()
    print("sums agree on two nodes; a lost leader fails all; fit as native, pinned by machine")
