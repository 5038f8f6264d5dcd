"""Connecting to Ray: an existing session or ``RAY_ADDRESS`` if there is one, else a local Ray
on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import random

import numpy as np
import ray

__all__ = ["ensure_ray", "started_locally"]

log = logging.getLogger(__name__)

_started_locally = False


def _use_loopback() -> None:
    """Make a Ray started from this process register its node under 127.0.0.1.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported; the constant is set
    too so that it also holds when ``ray`` was imported before raymodule.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@contextlib.contextmanager
def _callers_random_streams_kept():
    """Puts Python's ``random`` and ``numpy.random`` back as they were: starting Ray draws from
    ``random`` (it picks free ports), and MXNet code seeds both and expects repeats.
    ``mx.random`` has no getter; raymodule's client draws from it only where MXNet does."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def ensure_ray() -> None:
    """Connect to Ray if this process is not connected yet, leaving the caller's random
    streams where they were.

    With ``RAY_ADDRESS`` set, that cluster is joined; otherwise a local Ray is started on
    127.0.0.1 with this machine's CPUs and no dashboard.
    """
    global _started_locally
    if ray.is_initialized():
        return
    with _callers_random_streams_kept():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
            return
        _use_loopback()
        # address="local": never join a cluster that `ray start` left recorded on this machine.
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    _started_locally = True
    log.info("raymodule started a local Ray on 127.0.0.1: %s", ray.cluster_resources())


def started_locally() -> bool:
    """True when the Ray this process uses was started by raymodule (no autoscaler can help)."""
    return _started_locally
