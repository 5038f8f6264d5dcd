"""Gradient sums over ``ray.util.collective``: fused buckets, overlapped with backward.

Gradients are reduced last layer first, the order in which backward finishes them: while the
MXNet engine still computes earlier layers, finished buckets are already on the wire. Each
bucket is one collective call (gloo on CPU workers, NCCL on GPU workers) on a torch view of the
NDArrays' own memory (DLPack); a bucket of one array is reduced in place, several arrays are
packed into one buffer and copied back. ``reduce`` returns only when every bucket is summed,
so the optimizer never sees a partial step.

On CPU (gloo), dense buckets do not go through gloo between workers of one node: the ranks are
grouped by Ray node at rendezvous, each node's ranks sum a bucket through shared memory
(:class:`~raymodule.worker.shm.LocalGroup`: the sum is added in rank order and copied out of
one buffer, so every rank gets the same bits), and when the group spans nodes, one rank per
node (the lowest) sums the nodes' sums over gloo in a group of these leaders. With one node
dense gradients make no gloo call at all.

``row_sparse`` gradients stay sparse: every rank gathers every rank's row ids and rows and
sums rows of the same id (:func:`sum_rows`), so the bytes sent follow the rows touched, not
the size of the parameter, and the optimizer gets a row-sparse sum for MXNet's lazy update.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import mxnet as mx
import numpy as np
import ray
import torch
import torch.distributed as dist
import torch.utils.dlpack
from ray.util import collective as col

from .shm import LocalGroup

__all__ = ["Collective", "plan_buckets", "sum_rows", "free_address"]

GROUP_NAME = "default"


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


def sum_rows(ids: list[np.ndarray], rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The sum of row-sparse parts, given in rank order as each part's row ``ids`` (distinct,
    as a ``RowSparseNDArray``'s are) and ``rows``: the distinct ids of all parts, sorted, and
    their summed rows. Rows are added part after part, so every rank gets the same bits."""
    unique = np.unique(np.concatenate(ids))
    summed = np.zeros((len(unique),) + rows[0].shape[1:], rows[0].dtype)
    for part_ids, part_rows in zip(ids, rows):
        summed[np.searchsorted(unique, part_ids)] += part_rows
    return unique, summed


def free_address() -> str:
    """``host:port`` on this node where rank 0 can serve the rendezvous."""
    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def _rendezvous_store(address: str, world_size: int, rank: int, timeout) -> dist.TCPStore:
    """The group's rendezvous, served by rank 0 on ``address`` only: torch's TCPStore would
    listen on every interface, so rank 0 binds the socket itself and hands it over."""
    host, port = address.rsplit(":", 1)
    listen_fd = None
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, int(port)))
        listener.listen(128)
        listen_fd = listener.detach()
    return dist.TCPStore(
        host,
        int(port),
        world_size,
        is_master=rank == 0,
        timeout=timeout,
        master_listen_fd=listen_fd,
    )


def _as_torch(array: mx.nd.NDArray) -> torch.Tensor:
    """A torch tensor over the NDArray's memory; waits until MXNet's pending writes are done."""
    return torch.utils.dlpack.from_dlpack(array.to_dlpack_for_write())


class Collective:
    """This worker's membership in the gradient group (of two or more workers: a single
    worker has none), and the reduction of one step. ``shared_memory`` (gloo only) sums dense
    gradients of one node's ranks through shared memory; off, all go over gloo."""

    def __init__(
        self,
        world_size: int,
        rank: int,
        address: str,
        backend: str,
        timeout_s: float,
        shared_memory: bool = True,
    ):
        if address.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self._world_size = world_size
        self.waited_s = 0.0  # seconds reduce() waited for the sums (the others, the network)
        # seconds of this rank's dense sums per tier: "shared memory" (the node's ranks,
        # copies in and out included), "gloo" (across nodes; with no node group, all of it)
        self.tier_s = {"shared memory": 0.0, "gloo": 0.0}
        self._local: LocalGroup | None = None
        self._leaders = None  # the node leaders' gloo group, when the group spans nodes
        if backend == "gloo":
            # torch's own process group bounds every collective with `timeout`; Ray's wrapper
            # then adopts it as the default group (Ray's gloo_timeout bounds only rendezvous).
            timeout = datetime.timedelta(seconds=timeout_s)
            store = _rendezvous_store(address, world_size, rank, timeout)
            dist.init_process_group(
                "gloo", store=store, world_size=world_size, rank=rank, timeout=timeout
            )
            if shared_memory:
                self._form_local_group(store, rank, timeout, timeout_s)
        col.init_collective_group(
            world_size,
            rank,
            backend=backend,
            group_name=GROUP_NAME,
            gloo_timeout=int(timeout_s * 1000),
        )
        # one thread issues every collective call, so all ranks issue them in the same order
        self._comm = ThreadPoolExecutor(1, thread_name_prefix="raymodule-allreduce")

    def _form_local_group(self, store, rank: int, timeout, timeout_s: float) -> None:
        """Groups the ranks by node through the rendezvous store: each node's ranks sum
        through shared memory, and when there are several nodes, their leaders (each node's
        lowest rank) sum the nodes' sums in a gloo group of their own. With one rank on every
        node there is nothing to share: dense gradients go all over gloo, as without."""
        store.set(f"shm/member/{rank}", f"{ray.get_runtime_context().get_node_id()} {os.getpid()}")
        members = [store.get(f"shm/member/{r}").decode().split() for r in range(self._world_size)]
        nodes: dict[str, list[int]] = {}
        for r, (node, _) in enumerate(members):
            nodes.setdefault(node, []).append(r)
        if len(nodes) == self._world_size:  # a rank per node: nothing to share, all gloo
            return
        local = nodes[members[rank][0]]
        if len(nodes) > 1:
            leaders = sorted(ranks[0] for ranks in nodes.values())
            # every rank makes the subgroup, in the same order, as torch requires
            self._leaders = dist.new_group(leaders, timeout=timeout, backend="gloo")
        key = f"shm/control/{local[0]}"
        self._local = LocalGroup(
            local,
            [int(members[r][1]) for r in local],
            local.index(rank),
            timeout_s,
            publish=lambda name: store.set(key, name),
            lookup=lambda: store.get(key).decode(),
        )

    def close(self) -> None:
        """Leaves the group (the shared memory, Ray's wrapper and torch's WORLD), so that a
        new one can be formed in this process; works on a group broken by a lost peer too."""
        self._comm.shutdown(wait=False, cancel_futures=True)
        if self._local is not None:
            self._local.close()
        for leave in (lambda: col.destroy_collective_group(GROUP_NAME), dist.destroy_process_group):
            try:
                leave()
            except Exception:  # noqa: BLE001 - already gone, or never made
                pass

    def reduce(self, grads: list[mx.nd.NDArray], bucket_bytes: int) -> int:
        """Sum ``grads`` (in reduction order) across the group, in place: dense ones by
        allreduce, ``row_sparse`` ones as rows. Returns the bytes this rank handed to the
        collective calls (its payload, before the algorithm's own traffic)."""
        dense = [g for g in grads if g.stype == "default"]
        sparse = [g for g in grads if g.stype == "row_sparse"]
        sizes = [g.size * np.dtype(g.dtype).itemsize for g in dense]
        pending = []
        buckets = plan_buckets(sizes, bucket_bytes)
        if self._local is not None and buckets:
            largest = max(_packed_bytes([dense[i] for i in bucket]) for bucket in buckets)
            pending.append((None, None, self._comm.submit(self._local.reserve, largest)))
        for bucket in buckets:
            tensors = [_as_torch(dense[i]) for i in bucket]
            if self._local is not None:  # summed and copied back in the shared memory
                pending.append((tensors, None, self._comm.submit(self._sum_on_node, tensors)))
                continue
            if len(tensors) == 1 and tensors[0].is_contiguous():
                flat = tensors[0]
            else:
                flat = torch.cat([t.reshape(-1) for t in tensors])
            pending.append((tensors, flat, self._comm.submit(self._allreduce, flat)))
        sent = sum(sizes)
        if sparse:
            parts = [(g.indices.asnumpy(), g.data.asnumpy()) for g in sparse]
            summed = self._comm.submit(self._sum_rows, parts)
        for tensors, flat, done in pending:
            tic = time.perf_counter()
            done.result()
            self.waited_s += time.perf_counter() - tic
            if flat is None or flat is tensors[0]:
                continue
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
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

    def _allreduce(self, flat: torch.Tensor) -> None:
        """One bucket summed over gloo by every rank (no node group)."""
        tic = time.perf_counter()
        col.allreduce(flat, GROUP_NAME)
        self.tier_s["gloo"] += time.perf_counter() - tic

    def _sum_on_node(self, tensors: list[torch.Tensor]) -> None:
        """One bucket summed in place through this node's shared memory (packed as
        ``torch.cat`` would pack it) and, when the group spans nodes, across the leaders."""
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
        after_sum = self._sum_across_nodes if self._leaders is not None else None
        tic, across = time.perf_counter(), self.tier_s["gloo"]
        self._local.sum(tensors, dtype, after_sum)
        across = self.tier_s["gloo"] - across
        self.tier_s["shared memory"] += time.perf_counter() - tic - across

    def _sum_across_nodes(self, flat: torch.Tensor) -> None:
        """The leader's part across nodes: its node's sum, summed with the other leaders'."""
        tic = time.perf_counter()
        dist.all_reduce(flat, group=self._leaders)
        self.tier_s["gloo"] += time.perf_counter() - tic

    def _sum_rows(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list, int]:
        """Each row-sparse part's (ids, rows) summed over the group, and the bytes this rank
        sent. All-gather takes equal sizes: the counts go first, then the ids and rows of each
        part, padded to the most rows a rank has of it, which the receivers trim off."""
        counts = torch.tensor([len(ids) for ids, _ in parts], dtype=torch.int64)
        per_rank = [c.tolist() for c in self._all_gather(counts)]
        sent = _nbytes(counts)
        sums = []
        for k, (ids, rows) in enumerate(parts):
            n = [c[k] for c in per_rank]
            if max(n) == 0:  # no rank touched a row
                sums.append(sum_rows([ids], [rows]))
                continue
            padded = [_padded(ids, max(n)), _padded(rows, max(n))]
            all_ids, all_rows = (self._all_gather(t) for t in padded)
            sums.append(
                sum_rows(
                    [t[:c].numpy() for t, c in zip(all_ids, n)],
                    [t[:c].numpy() for t, c in zip(all_rows, n)],
                )
            )
            sent += sum(_nbytes(t) for t in padded)
        return sums, sent

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (all of one shape), in rank order."""
        out = [torch.empty_like(tensor) for _ in range(self._world_size)]
        col.allgather(out, tensor, GROUP_NAME)
        return out


def _padded(array: np.ndarray, length: int) -> torch.Tensor:
    """``array`` with zeros appended along its first axis up to ``length``."""
    source = torch.from_numpy(array)
    out = torch.zeros((length,) + tuple(source.shape[1:]), dtype=source.dtype)
    out[: len(source)] = source
    return out


def _packed_bytes(arrays: list[mx.nd.NDArray]) -> int:
    """The bytes of ``arrays`` packed into one flat array of their common dtype."""
    return sum(a.size for a in arrays) * np.result_type(*[a.dtype for a in arrays]).itemsize


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
