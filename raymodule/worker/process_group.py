"""The gradient group's process group over the network: torch.distributed (gloo) on CPU
workers, Ray's collective (NCCL) on GPU workers.

Importing torch costs a worker seconds of CPU, so only a group that needs the network makes
one (:class:`raymodule.worker.collective.Collective` decides): a group spanning nodes, one with
the shared-memory sum switched off, or, lazily, one that sums ``row_sparse`` gradients.
Every collective call is bounded by the group's timeout (torch's process group enforces it;
Ray's gloo timeout bounds only the rendezvous).
"""

from __future__ import annotations

import datetime
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.dlpack
from ray.util import collective as col

__all__ = ["ProcessGroup", "listen", "sum_rows"]

GROUP_NAME = "default"


def listen(address: str) -> socket.socket:
    """Rank 0's listening socket for the rendezvous on ``address`` (``host:port``; port 0: any
    free one), bound to that host only: torch's TCPStore would listen on every interface."""
    host, port = address.rsplit(":", 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(128)
    return listener


def sum_rows(ids: list[np.ndarray], rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The sum of row-sparse parts, given in rank order as each part's row ``ids`` (distinct,
    as a ``RowSparseNDArray``'s are) and ``rows``: the distinct ids of all parts, sorted, and
    their summed rows. Rows are added part after part, so every rank gets the same bits."""
    unique = np.unique(np.concatenate(ids))
    summed = np.zeros((len(unique),) + rows[0].shape[1:], rows[0].dtype)
    for part_ids, part_rows in zip(ids, rows):
        summed[np.searchsorted(unique, part_ids)] += part_rows
    return unique, summed


class ProcessGroup:
    """This rank's membership in the network group. ``address`` is where rank 0 serves the
    rendezvous (``listener``: rank 0's socket already bound there, else it binds it)."""

    def __init__(
        self,
        world_size: int,
        rank: int,
        address: str,
        backend: str,
        timeout_s: float,
        listener: socket.socket | None = None,
    ):
        if address.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self._world_size = world_size
        self.store = None
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self.close()  # one a close overtook (made in the reducing thread as the group broke)
        if backend == "gloo":
            # torch's own process group bounds every collective with `timeout`; Ray's wrapper
            # then adopts it as the default group (Ray's gloo_timeout bounds only rendezvous).
            if rank == 0 and listener is None:
                listener = listen(address)
            host, port = address.rsplit(":", 1)
            self.store = dist.TCPStore(
                host,
                int(port),
                world_size,
                is_master=rank == 0,
                timeout=self._timeout,
                master_listen_fd=listener.detach() if rank == 0 else None,
            )
            dist.init_process_group(
                "gloo", store=self.store, world_size=world_size, rank=rank, timeout=self._timeout
            )
        col.init_collective_group(
            world_size,
            rank,
            backend=backend,
            group_name=GROUP_NAME,
            gloo_timeout=int(timeout_s * 1000),
        )

    def subgroup(self, ranks: list[int]):
        """A gloo group of ``ranks``; every rank must make it, in the same order."""
        return dist.new_group(ranks, timeout=self._timeout, backend="gloo")

    @staticmethod
    def pack(arrays: list) -> tuple[torch.Tensor, object]:
        """A flat tensor of ``arrays`` (NDArrays, on any device) for :meth:`allreduce`, and the
        function that copies its sum back into them (None: it is the array's own memory)."""
        tensors = [_as_torch(a) for a in arrays]
        if len(tensors) == 1 and tensors[0].is_contiguous():
            return tensors[0], None
        flat = torch.cat([t.reshape(-1) for t in tensors])

        def unpack() -> None:
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

        return flat, unpack

    def allreduce(self, flat, group=None) -> None:
        """Sums ``flat`` (a tensor, or a numpy array) in place over the group (or the
        ``subgroup``)."""
        tensor = torch.from_numpy(flat) if isinstance(flat, np.ndarray) else flat
        if group is None:
            col.allreduce(tensor, GROUP_NAME)
        else:
            dist.all_reduce(tensor, group=group)

    def sum_rows(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list, int]:
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

    def close(self) -> None:
        """Leaves Ray's wrapper and torch's WORLD, those that exist."""
        if col.is_group_initialized(GROUP_NAME):
            try:
                col.destroy_collective_group(GROUP_NAME)
            except Exception:  # noqa: BLE001 - broken by a lost peer: gone with it
                pass
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - as above
                pass


def _as_torch(array) -> torch.Tensor:
    """A torch tensor over an NDArray's memory; waits until MXNet's pending writes are done."""
    return torch.utils.dlpack.from_dlpack(array.to_dlpack_for_write())


def _padded(array: np.ndarray, length: int) -> torch.Tensor:
    """``array`` with zeros appended along its first axis up to ``length``."""
    source = torch.from_numpy(array)
    out = torch.zeros((length,) + tuple(source.shape[1:]), dtype=source.dtype)
    out[: len(source)] = source
    return out


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
