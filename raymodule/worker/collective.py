"""Gradient sums of a group of workers: fused buckets, overlapped with backward.

Gradients are reduced last layer first, the order in which backward finishes them: while the
MXNet engine still computes earlier layers, finished buckets are already summed. ``reduce``
returns only when every bucket is summed, so the optimizer never sees a partial step.

On CPU (gloo), dense buckets do not go over the network between workers of one node: each node's
ranks sum a bucket through shared memory (:class:`~raymodule.worker.shm.LocalGroup`: the sum is
added in rank order and copied out of one buffer, so every rank gets the same bits; or, for an
update that only reads it, such as plain SGD's, read where it is:
:meth:`Collective.reduce_shared`), and when the group spans nodes, one rank per node (the
lowest) sums the nodes' sums over gloo in a group of these leaders
(:class:`~raymodule.worker.process_group.ProcessGroup`). A group on one node
(:class:`~raymodule.worker.shm.SameNode`) meets in shared memory alone and never imports torch,
which costs each worker seconds of CPU; it makes a process group only if it sums ``row_sparse``
gradients. Without the shared-memory sum (switched off, or on a machine other than x86-64:
:func:`~raymodule.worker.shm.usable_here`), or on GPUs (NCCL), every bucket is one collective call
on the NDArrays' own memory (a bucket of one array in place, several packed into one buffer and
copied back).

``row_sparse`` gradients stay sparse: every rank gathers every rank's row ids and rows and
sums rows of the same id (:func:`~raymodule.worker.process_group.sum_rows`), so the bytes sent
follow the rows touched, not the size of the parameter, and the optimizer gets a row-sparse
sum for MXNet's lazy update.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import mxnet as mx
import numpy as np
import ray

from . import native
from .shm import LocalGroup, PartlyUpdated, SameNode, usable_here

__all__ = ["Alone", "Collective", "PartlyUpdated", "SameNode", "plan_buckets", "free_address"]


def plan_buckets(sizes_bytes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Group array indices (already in reduction order) into buckets of at most ``bucket_bytes``.

    An array larger than a bucket gets a bucket of its own.
    """
    buckets: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, size in enumerate(sizes_bytes):
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(index)
        used += size
    if current:
        buckets.append(current)
    return buckets


def free_address() -> str:
    """``host:port`` on this node where rank 0 can serve the rendezvous."""
    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


class Alone:
    """The group of a worker with no peers: one worker alone in its run, or one out of its
    group until it is formed again. Its gradients are already the sum, so it updates from
    them as they are."""

    has_peers = False  # reduce() writes nothing over the gradients; no sockets to close

    def __init__(self):
        self.waited_s = 0.0
        self.tier_s = {"shared memory": 0.0, "gloo": 0.0}

    def splits_update(self, grads: list[mx.nd.NDArray], bucket_bytes: int) -> bool:
        return False

    def shares_sums(self, grads: list[mx.nd.NDArray], bucket_bytes: int) -> bool:
        return False

    def reduce(self, grads: list[mx.nd.NDArray], bucket_bytes: int) -> int:
        return 0

    def close(self) -> None:
        pass


class Collective:
    """This worker's membership in a gradient group of two or more workers (a worker alone
    is in an :class:`Alone`), and the reduction of one step. ``rendezvous`` is where rank 0
    serves the group's store (``host:port``), or a :class:`SameNode` group's shared memory.
    ``shared_memory`` (gloo only) sums dense gradients of one node's ranks through shared
    memory; off, all go over gloo."""

    has_peers = True  # reduce() writes the sums over the gradients

    def __init__(
        self,
        world_size: int,
        rank: int,
        rendezvous: str | SameNode,
        backend: str,
        timeout_s: float,
        shared_memory: bool = True,
    ):
        self._world_size, self._rank = world_size, rank
        self._backend, self._timeout_s = backend, timeout_s
        self.waited_s = 0.0  # seconds reduce() waited for the sums (the others, the network)
        # seconds of this rank's dense sums per tier: "shared memory" (the node's ranks,
        # copies in and out included), "gloo" (across nodes; with no node group, all of it)
        self.tier_s = {"shared memory": 0.0, "gloo": 0.0}
        self._local: LocalGroup | None = None
        self._network = None  # the ProcessGroup: across nodes, without shm, or for rows
        self._leaders = None  # the node leaders' gloo group, when the group spans nodes
        # reduce_shared's arrays over the sums in the shared memory, MXNet's kernels maybe
        # still reading them, and where they are: (address, dtype, shapes), arrays
        self._sums: tuple[tuple, list[mx.nd.NDArray]] | None = None
        if isinstance(rendezvous, SameNode):
            self._local = LocalGroup(
                list(range(world_size)),
                list(rendezvous.pids),
                rank,
                timeout_s,
                token=rendezvous.token,
            )
        else:
            from .process_group import ProcessGroup  # torch: seconds of CPU

            self._network = ProcessGroup(world_size, rank, rendezvous, backend, timeout_s)
            if backend == "gloo" and shared_memory:
                try:
                    self._form_local_group(self._network.store, rank, timeout_s)
                except BaseException:  # a peer lost, a store timeout: no group is left up
                    self._network.close()
                    raise
        # one thread issues every collective call, so all ranks issue them in the same order
        self._comm = ThreadPoolExecutor(1, thread_name_prefix="raymodule-allreduce")

    def _form_local_group(self, store, rank: int, timeout_s: float) -> None:
        """Groups the ranks by node through the rendezvous store: each node's ranks sum
        through shared memory, and when there are several nodes, their leaders (each node's
        lowest rank) sum the nodes' sums in a gloo group of their own. A rank on a machine
        whose shared memory is not :func:`usable_here` is a node of its own. With one rank on
        every node there is nothing to share: dense gradients go all over gloo, as without."""
        node = ray.get_runtime_context().get_node_id()
        if not usable_here():
            node = f"{node}/{rank}"
        store.set(f"shm/member/{rank}", f"{node} {os.getpid()}")
        members = [store.get(f"shm/member/{r}").decode().split() for r in range(self._world_size)]
        nodes: dict[str, list[int]] = {}
        for r, (node, _) in enumerate(members):
            nodes.setdefault(node, []).append(r)
        if len(nodes) == self._world_size:  # a rank per node: nothing to share, all gloo
            return
        local = nodes[members[rank][0]]
        if len(nodes) > 1:
            # every rank makes the subgroup, in the same order, as torch requires
            self._leaders = self._network.subgroup(sorted(ranks[0] for ranks in nodes.values()))
        key = f"shm/control/{local[0]}"
        self._local = LocalGroup(
            local,
            [int(members[r][1]) for r in local],
            local.index(rank),
            timeout_s,
            publish=lambda name: store.set(key, name),
            lookup=lambda: store.get(key).decode(),
        )

    def splits_update(self, grads: list[mx.nd.NDArray], bucket_bytes: int) -> bool:
        """Whether the update of ``grads`` may be split among this group's ranks
        (:meth:`reduce_and_update`): :meth:`shares_sums` holds (``grads`` fit in one bucket of
        ``bucket_bytes``, so the shared memory stays as small as the buckets' would be) and
        the group has no other node."""
        return self._leaders is None and self.shares_sums(grads, bucket_bytes)

    def shares_sums(self, grads: list[mx.nd.NDArray], bucket_bytes: int) -> bool:
        """Whether :meth:`reduce_shared` may sum ``grads``: dense, of one dtype, in one bucket
        of ``bucket_bytes``, with two or more of the group's ranks on this node (and other
        nodes or not)."""
        return (
            self._local is not None
            and self._local.size > 1
            and all(g.stype == "default" for g in grads)
            and len({np.dtype(g.dtype) for g in grads}) == 1
            and _packed_bytes(grads) <= bucket_bytes
        )

    def reduce_shared(self, grads: list[mx.nd.NDArray]) -> list[mx.nd.NDArray]:
        """Sums ``grads`` (in reduction order; :meth:`shares_sums` holds) across the group and
        leaves them as they are: returns MXNet arrays over the sums, shaped as ``grads``, in
        this node's shared memory, where they were summed. Saves copying the sums out. The
        other local ranks read them too: nothing may write them. They hold until this rank's
        next call on the group, which first waits for MXNet to finish reading them (as for
        every array it views: :func:`native.host_views`)."""
        views = native.host_views(grads)
        count = sum(a.size for a in views)
        reserved = self._comm.submit(self._local.reserve, count * views[0].dtype.itemsize)
        summed = self._comm.submit(self._sum_on_node, views, False)
        tic = time.perf_counter()
        try:
            reserved.result()
            flat = summed.result()
        finally:
            self.waited_s += time.perf_counter() - tic
        key = (flat.ctypes.data, flat.dtype, tuple(a.shape for a in views))
        if self._sums is None or self._sums[0] != key:  # made once per segment and layout
            arrays, at = [], 0
            for a in views:
                over = flat[at : at + a.size].reshape(a.shape)
                if a.size:
                    arrays.append(mx.nd.from_numpy(over))
                else:  # nothing to read in place; of the gradient's dtype all the same
                    arrays.append(mx.nd.array(over, dtype=over.dtype))
                at += a.size
            self._sums = key, arrays
        return self._sums[1]

    def reduce_and_update(
        self,
        grads: list[mx.nd.NDArray],
        update: Callable[[int, int], None],
        groups: list[list[np.ndarray]],
    ) -> None:
        """Sums dense ``grads`` (in reduction order, one bucket) across the group, for which
        :meth:`splits_update` holds, and splits the update among its ranks: ``update(lo, hi)``
        updates this rank's part (a range of the gradients' flat concatenation) of
        ``groups``, arrays laid out as the gradients (the weights, their state), and the
        ranks share their parts (see :meth:`LocalGroup.sum_and_update`, which also says what
        a lost peer raises). The sum here, the update's time aside, counts as waiting."""
        views = native.host_views(grads)  # MXNet done with the last sums too: they are rewritten
        dtype = np.result_type(*[a.dtype for a in views])
        count = sum(a.size for a in views)
        updating = 0.0

        def timed_update(lo: int, hi: int) -> None:
            nonlocal updating
            tic = time.perf_counter()
            update(lo, hi)
            updating += time.perf_counter() - tic

        tic = time.perf_counter()
        try:
            shared = sum(a.size for arrays in groups for a in arrays) * dtype.itemsize
            self._local.reserve(count * dtype.itemsize, shared)
            self._local.sum_and_update(views, dtype, timed_update, groups)
        finally:
            took = time.perf_counter() - tic - updating
            self.waited_s += took
            self.tier_s["shared memory"] += took

    def close(self) -> None:
        """Leaves the group (the shared memory, the process group), so that a new one can be
        formed in this process; works on a group broken by a lost peer too."""
        self._comm.shutdown(wait=False, cancel_futures=True)
        self._sums = None  # MXNet frees them once read: the memory stays mapped till then
        if self._local is not None:
            self._local.close()
        if self._network is not None:
            self._network.close()

    def reduce(self, grads: list[mx.nd.NDArray], bucket_bytes: int) -> int:
        """Sum ``grads`` (in reduction order) across the group, in place: dense ones by
        allreduce, ``row_sparse`` ones as rows. Returns the bytes this rank handed to the
        collective calls (its payload, before the algorithm's own traffic)."""
        if self._sums is not None:  # MXNet done reading reduce_shared's last sums: rewritten
            native.wait_for_engine()  # (a GPU's arrays wait, each for itself, in the packing)
        dense = [g for g in grads if g.stype == "default"]
        sparse = [g for g in grads if g.stype == "row_sparse"]
        sizes = [g.size * np.dtype(g.dtype).itemsize for g in dense]
        pending = []
        buckets = plan_buckets(sizes, bucket_bytes)
        if self._local is not None and buckets:
            largest = max(_packed_bytes([dense[i] for i in bucket]) for bucket in buckets)
            pending.append((None, self._comm.submit(self._local.reserve, largest)))
        for bucket in buckets:
            arrays = [dense[i] for i in bucket]
            if self._local is not None:  # summed and copied back in the shared memory
                views = native.host_views(arrays)
                pending.append((None, self._comm.submit(self._sum_on_node, views)))
                continue
            flat, unpack = self._network.pack(arrays)
            pending.append((unpack, self._comm.submit(self._allreduce, flat)))
        sent = sum(sizes)
        if sparse:
            parts = [(g.indices.asnumpy(), g.data.asnumpy()) for g in sparse]
            summed = self._comm.submit(self._sum_rows, parts)
        for unpack, done in pending:
            tic = time.perf_counter()
            done.result()
            self.waited_s += time.perf_counter() - tic
            if unpack is not None:
                unpack()
        if sparse:
            tic = time.perf_counter()
            sums, sparse_sent = summed.result()
            self.waited_s += time.perf_counter() - tic
            for grad, (ids, rows) in zip(sparse, sums):
                mx.nd.sparse.row_sparse_array(
                    (rows, ids), shape=grad.shape, ctx=grad.context, dtype=grad.dtype
                ).copyto(grad)
            sent += sparse_sent
        return sent

    def _allreduce(self, flat) -> None:
        """One bucket summed over the network by every rank (no node group)."""
        tic = time.perf_counter()
        self._network.allreduce(flat)
        self.tier_s["gloo"] += time.perf_counter() - tic

    def _sum_on_node(self, arrays: list[np.ndarray], copy_out: bool = True) -> np.ndarray:
        """One bucket summed through this node's shared memory (packed in one flat array of
        the arrays' common dtype) and, when the group spans nodes, across the leaders: in
        place, or with ``copy_out`` False left in the shared memory (see
        :meth:`LocalGroup.sum`). Returns the sum there."""
        dtype = np.result_type(*[a.dtype for a in arrays])
        after_sum = self._sum_across_nodes if self._leaders is not None else None
        tic, across = time.perf_counter(), self.tier_s["gloo"]
        flat = self._local.sum(arrays, dtype, after_sum, copy_out)
        across = self.tier_s["gloo"] - across
        self.tier_s["shared memory"] += time.perf_counter() - tic - across
        return flat

    def _sum_across_nodes(self, flat: np.ndarray) -> None:
        """The leader's part across nodes: its node's sum, summed with the other leaders'."""
        tic = time.perf_counter()
        self._network.allreduce(flat, group=self._leaders)
        self.tier_s["gloo"] += time.perf_counter() - tic

    def _sum_rows(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list, int]:
        """The row-sparse parts summed over the group (see :meth:`ProcessGroup.sum_rows`);
        a group on one node makes its process group first, at its first such sum, every rank
        at the same call: rank 0 listens on a free port and hands it over in shared memory."""
        if self._network is None:
            from .process_group import ProcessGroup, listen  # torch: seconds of CPU

            host = ray.util.get_node_ip_address()
            listener = listen(f"{host}:0") if self._rank == 0 else None
            port = self._local.share_port(listener.getsockname()[1] if listener else None)
            self._network = ProcessGroup(
                self._world_size,
                self._rank,
                f"{host}:{port}",
                self._backend,
                self._timeout_s,
                listener=listener,
            )
        return self._network.sum_rows(parts)


def _packed_bytes(arrays: list[mx.nd.NDArray]) -> int:
    """The bytes of ``arrays`` packed into one flat array of their common dtype."""
    return sum(a.size for a in arrays) * np.result_type(*[a.dtype for a in arrays]).itemsize
