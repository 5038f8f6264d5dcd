"""The ``kvstore`` names raymodule accepts: every synchronous one selects its Ray allreduce."""

from __future__ import annotations

import mxnet as mx

__all__ = ["SUPPORTED_KVSTORES", "check_kvstore"]

SUPPORTED_KVSTORES = (
    "local",
    "device",
    "nccl",
    "dist_sync",
    "dist_device_sync",
    "dist_sync_device",
)


def check_kvstore(kvstore) -> None:
    if kvstore is None or (isinstance(kvstore, str) and kvstore in SUPPORTED_KVSTORES):
        return
    supported = ", ".join(repr(k) for k in SUPPORTED_KVSTORES)
    if isinstance(kvstore, mx.kvstore.KVStoreBase):
        raise ValueError(
            f"kvstore={type(kvstore).__name__} object: raymodule replaces the KVStore with a "
            f"synchronous Ray allreduce; pass a kvstore name instead ({supported})"
        )
    if isinstance(kvstore, str) and "async" in kvstore:
        raise ValueError(
            f"kvstore={kvstore!r}: asynchronous updates are not supported; raymodule trains "
            f"synchronously (use one of {supported})"
        )
    raise ValueError(f"kvstore={kvstore!r} is not supported; use one of {supported} or None")
