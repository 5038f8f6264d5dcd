"""One owner per run: a lease object in the run folder, renewed while the run lives.

``<run>/lease.json`` holds its owner: a random id, the host, the pid, the Ray job id when there
is one, and the time of the last renewal. A run takes the lease before it writes anything; a
second run of the same name finds it renewed within ``RAYMODULE_LEASE_TTL_S`` and refuses at
once, naming the owner. The owner renews it every quarter of the TTL and deletes it when it
closes; a lease whose owner died without closing is taken over at once when the owner ran on
this host and its process is gone (a killed job started again), else once it is a TTL old
(hosts' clocks must agree to well within the TTL). The lease is per process: a fit that did
not close its run leaves it to the next fit of the same process.

Object stores (and pyarrow over any storage) have no compare-and-swap, so the last writer of
the lease owns it, and ownership is verified by reading it back: after taking it, at every
renewal, before a checkpoint's first write and its commit, before each delete (an interrupted
or superseded checkpoint, one beyond ``keep``), before each metrics write and before the lease
itself is deleted. A run that finds another owner stops (:class:`LeaseLost`) and writes and
deletes nothing more; one that finds no lease (a storage server that lost it, a hand that
deleted it) takes it again. One whose lease cannot be read (a server killed while it was
renewed can leave it so) writes it anew only if it renewed it less than half a TTL ago, when no
other run can have taken it over; later, the check fails as storage does (``OSError``), and
nothing is written over what may be another run's lease.

What this does not close, honestly: a check and the write or delete after it are two requests,
so a run that loses the lease between them (another run took it over after the TTL, or two
runs took a free lease at the same moment and both read their own back before the later write
landed) still makes that one write or delete. The window is one storage request (a checkpoint's
files, written between two checks, are in a folder of their own step and are not committed
without a check). A run whose renewals stall for longer than the TTL can be taken over while
it still trains; it finds out at its next check. Runs of one name are meant to be one at a
time: the lease makes a second one fail at once and a stale one stop, it does not make two
concurrent writers safe.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time

from .errors import CheckpointError
from .storage import Folder

__all__ = ["LEASE", "Lease", "LeaseLost"]

log = logging.getLogger(__name__)

LEASE = "lease.json"
_MAX_BYTES = 64 * 1024


class LeaseLost(CheckpointError):
    """Another run owns the run folder now; this run must stop without writing."""


class Lease:
    """This process's lease on the run folder ``folder`` (the run ``name``)."""

    def __init__(self, folder: Folder, name: str, ttl_s: float):
        self.folder, self.name, self.ttl_s = folder, name, ttl_s
        self.owner = {
            "owner": secrets.token_hex(8),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": _job_id(),
        }
        self._lost: str | None = None
        self._renewed = float("-inf")  # the heartbeat of this run's last write of the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lease, or raises ``CheckpointError`` naming the live run that holds it."""
        held = self._read()
        mine = held is not None and (held.get("host"), held.get("pid")) == (
            self.owner["host"],
            self.owner["pid"],
        )
        if mine:  # an earlier fit of this process that never closed: its renewals stop
            log.info("run %r: taking over the lease this process held before", self.name)
        elif held is not None and _gone(held):
            log.warning(
                "run %r: taking over from %s, whose process is gone", self.name, _describe(held)
            )
        elif held is not None:
            age = time.time() - held["heartbeat"]
            if age < self.ttl_s:
                raise CheckpointError(
                    f"run {self.name!r} at {self.folder} is in use by another run "
                    f"({_describe(held)}; lease renewed {max(age, 0):.0f} s ago). Wait for it "
                    f"to finish or stop it; if it died, it can be taken over in "
                    f"{self.ttl_s - age:.0f} s (RAYMODULE_LEASE_TTL_S={self.ttl_s:g}); or "
                    "choose another name"
                )
            log.warning(
                "run %r: taking over from %s, whose lease was last renewed %.0f s ago",
                self.name, _describe(held), age,
            )  # fmt: skip
        self._write()
        self.check()
        self._thread = threading.Thread(target=self._renew, name="raymodule-run-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raises :class:`LeaseLost` unless this run still owns the folder (read now)."""
        if self._lost is None:
            try:
                held = self._read()
            except OSError as err:  # stored, but the store cannot serve it (a server killed
                # while it was renewed). Written anew below only while this run's last renewal
                # is too recent for anyone to have taken the lease over; if storage is down,
                # the write fails too
                age = time.time() - self._renewed
                if age >= self.ttl_s / 2:
                    raise OSError(
                        f"run {self.name!r}: its lease cannot be read ({err}), and it was last "
                        f"renewed {age:.0f} s ago: another run may own {self.folder} now "
                        f"(RAYMODULE_LEASE_TTL_S={self.ttl_s:g}), so it is not written over"
                    ) from None
                log.warning("run %r: its lease cannot be read (%s)", self.name, err)
                held = None
            if held is None:  # lost by storage (a server restarted) or by hand: nobody else's
                log.warning("run %r: its lease is gone from %s; taking it again", self.name,
                            self.folder)  # fmt: skip
                self._write()
            elif held["owner"] != self.owner["owner"]:
                self._lost = (
                    f"run {self.name!r} no longer owns {self.folder}: {_describe(held)} holds it "
                    "now. This run stops without writing or deleting anything more"
                )
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def known_lost(self) -> None:
        """Raises :class:`LeaseLost` if this run is known to have lost the folder (reads
        nothing: for callers that must not wait on storage)."""
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def release(self) -> None:
        """Stops renewing, and deletes the lease if it is still this run's. Every check after
        it raises :class:`LeaseLost`: a checkpoint still being written when the run closed
        (its close timed out) writes nothing more, nor takes the lease back."""
        self._stop.set()
        if self._thread is not None:  # a renewal stuck longer than the TTL lost the lease anyway
            self._thread.join(timeout=self.ttl_s)
        try:
            self.check()
            self.folder.delete(LEASE)
        except (LeaseLost, OSError) as err:
            log.warning("run %r: lease not released: %s", self.name, err)
        if self._lost is None:
            self._lost = f"run {self.name!r} was closed: it released {self.folder}"

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.check()
                self._write()
            except LeaseLost as err:
                log.warning("%s", err)
                return
            except OSError as err:  # storage that fails now may answer at the next renewal
                log.warning("run %r: could not renew its lease: %s", self.name, err)

    def _write(self) -> None:
        record = dict(self.owner, heartbeat=time.time(), ttl_s=self.ttl_s)
        self.folder.write(LEASE, json.dumps(record).encode())
        self._renewed = record["heartbeat"]

    def _read(self) -> dict | None:
        """The lease as stored, or None when there is none (or none that reads as one)."""
        try:
            held = json.loads(self.folder.read(LEASE, limit=_MAX_BYTES))
        except FileNotFoundError:
            return None
        except ValueError as err:
            log.warning("run %r: ignoring %s/%s, which is no lease: %s", self.name, self.folder,
                        LEASE, err)  # fmt: skip
            return None
        if not isinstance(held, dict) or not isinstance(held.get("owner"), str):
            return None
        if not isinstance(held.get("heartbeat"), int | float):
            return None
        return held


def _describe(held: dict) -> str:
    job = f", Ray job {held['job_id']}" if held.get("job_id") else ""
    return f"owner {held['owner']} on host {held.get('host')!r}, pid {held.get('pid')}{job}"


def _gone(held: dict) -> bool:
    """Whether the lease's owner ran on this host in a process that no longer exists."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False


def _job_id() -> str | None:
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - no job: the host and pid name the owner
        return None
