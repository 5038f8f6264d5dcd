"""The sum of co-located workers' gradients through POSIX shared memory.

A :class:`LocalGroup` is the ranks of one gradient group that run on one node. Its leader (the
lowest of them) creates the segments; the others attach; the leader unlinks each segment as
soon as every local rank has attached it, so the memory lives only as long as the processes
that map it and a SIGKILL of any of them afterwards leaks nothing. Segment names say who made
them, ``raymodule-<creator pid>-<its start time>-<token>-<number>``: a leader removes those of
dead creators (a kill inside the attach window) when it forms a group, their pid reused by
another process or not.

Two segments:

- control: int64 slots, each written by one rank only (no atomics needed): a ``broken`` flag
  any rank may raise, the data segment's number (written by the leader), and per rank a
  barrier sequence number and the number of the last segment it attached;
- data: one slot per rank for its copy of a bucket, one for the sum, and a shared area. A bucket
  is summed in two barriers: every rank copies its bucket into its slot; barrier; rank ``i``
  sums the ``i``-th part of all slots in rank order into the sum slot; barrier; every rank
  copies the sum out, or reads it where it is until its next call (the next bucket's first
  barrier keeps the sum until everyone has it, or is done reading it). With an update split
  among the ranks (:meth:`LocalGroup.sum_and_update`), the second barrier also shares it:
  between the two, rank ``i`` updates its part of the weights and their state from its part of
  the sum and writes it into the shared area; after the second, every rank copies the others'
  parts out (the next call's first barrier keeps them until everyone has them). The data segment
  is sized by the largest bucket and the largest shared arrays seen; a larger one makes the
  leader create a bigger segment, at the same call on every rank, since all ranks plan the same.

Every wait is bounded by the collective timeout and watches the local peers: a dead peer
raises at once, naming it. Slots are written and read through plain aligned int64 stores and
loads, ordered as x86-64's memory model orders them (stores seen in program order); raising
the broken flag and arriving at a barrier are each followed by a fence, so a rank's later
look at the others' slots cannot come before its own store is seen. Other machines (aarch64,
POWER) may show a rank's stores to its peers out of order, a barrier's arrival before the bucket
copied in ahead of it: their workers sum over gloo (:func:`usable_here`).
"""

from __future__ import annotations

import os
import platform
import re
import secrets
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

__all__ = [
    "LocalGroup",
    "PartlyUpdated",
    "SameNode",
    "remove_stale_segments",
    "segment_prefix",
    "usable_here",
]

PREFIX = "raymodule-"
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory segments
# a segment's name: its creator's pid and start time (segment_prefix), a token, a number
_NAME = re.compile(rf"{PREFIX}(\d+)-(\d+)-[0-9a-f]+-\d+")
ALIGN = 64  # bytes: each data slot starts on a cache line
_BROKEN, _DATA_NUMBER, _PORT, _HEADER = 0, 1, 2, 3
_CHECK_INTERVAL_S = 0.001  # how often a wait looks at the peers and the clock
_CLOSE_WAIT_S = 1.0  # how long close waits for a sum running in another thread to end
_FENCE_LOCK = threading.Lock()  # taken only by _fence
_STORES_IN_ORDER = frozenset({"x86_64", "amd64"})  # platform.machine(), lower case


@dataclass(frozen=True)
class SameNode:
    """The rendezvous of a gradient group whose ranks all run on one node: the ranks'
    processes (``pids``, in rank order) and ``token``, which names the generation's shared
    memory (its leader's control segment is ``segment_prefix(pids[0], token) + "1"``)."""

    pids: tuple[int, ...]
    token: str


def usable_here() -> bool:
    """Whether sums through shared memory are right on this machine: its cores see each
    other's stores in the order they were made (x86-64), which the barriers rely on."""
    return platform.machine().lower() in _STORES_IN_ORDER


def segment_prefix(pid: int, token: str) -> str:
    """The start of the names of the segments that process ``pid`` (alive) creates for the
    group generation ``token``: ``raymodule-<pid>-<start time>-<token>-``."""
    started = _started(pid)
    if started is None:
        raise RuntimeError(f"process {pid} is gone")
    return f"{PREFIX}{pid}-{started}-{token}-"


def _started(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (``/proc/<pid>/stat``'s 22nd
    field), or None if there is no such process. With the pid, it names one process: a pid
    is reused, the pair not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read()
    except (FileNotFoundError, ProcessLookupError):  # none, or it ended as it was read
        return None
    return int(fields[fields.rindex(b")") + 2 :].split()[19])  # fields after the name's ")"


def remove_stale_segments() -> list[str]:
    """Unlinks the segments in ``/dev/shm`` whose creator (the pid and start time in their
    name) is gone; returns their names."""
    removed = []
    for name in os.listdir(SHM_DIR):
        match = _NAME.fullmatch(name)
        if match and _started(int(match[1])) != int(match[2]):
            try:
                os.unlink(_path(name))
                removed.append(name)
            except (FileNotFoundError, PermissionError):  # gone; another user's (hidepid)
                pass
    return removed


class _Peer:
    """A local peer's process, watched through a pidfd (which a dead process makes readable,
    zombie or not, and which a reused pid cannot fool)."""

    def __init__(self, rank: int, pid: int):
        self.rank, self.pid, self._fd = rank, pid, -1
        self._fd = os.pidfd_open(pid)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def dead(self) -> bool:
        return bool(self._poll.poll(0))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    __del__ = close  # a group whose close() left a sum running closes them when it goes


class PartlyUpdated(RuntimeError):
    """The group broke in a split update after every rank's gradients were in: the part
    ``[lo, hi)`` of ``count`` elements is updated on this rank, the rest (if any) not."""

    def __init__(self, lo: int, hi: int, count: int, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.lo, self.hi, self.count = lo, hi, count


def _add(slots: list[np.ndarray], lo: int, hi: int, out: np.ndarray) -> None:
    """Elements ``[lo, hi)`` of the ranks' slots (all but the last, the sum's) added in rank
    order into ``out``: the same bits wherever it runs."""
    ranks = slots[:-1]
    if len(ranks) == 1:
        out[...] = ranks[0][lo:hi]
        return
    np.add(ranks[0][lo:hi], ranks[1][lo:hi], out=out)
    for slot in ranks[2:]:
        np.add(out, slot[lo:hi], out=out)


def _pieces(arrays: list[np.ndarray], lo: int, hi: int) -> list[tuple[np.ndarray, int]]:
    """The elements ``[lo, hi)`` of the flat concatenation of ``arrays``: flat views of the
    arrays' pieces in that range, each with its offset in the concatenation."""
    pieces, offset = [], 0
    for a in arrays:
        start, stop = max(lo, offset), min(hi, offset + a.size)
        if start < stop:
            pieces.append((a.reshape(-1)[start - offset : stop - offset], start))
        offset += a.size
    return pieces


def _fence() -> None:
    """A full memory barrier: this thread's stores are seen by other cores before its later
    loads happen. Taking an uncontended lock is an atomic read-modify-write (x86-64's
    ``lock cmpxchg``, glibc's semaphores under CPython's locks), which is one."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


def _path(name: str) -> str:
    """Where the segment ``name`` is on this Linux node (``SharedMemory`` hides the path)."""
    return os.path.join(SHM_DIR, name)


def _segment(name: str, size: int = 0) -> SharedMemory:
    """Creates (``size`` > 0) or attaches the segment ``name``, kept out of Python's resource
    tracker: this group unlinks it, and the tracker would unlink it as soon as a process that
    attached it exits. A created segment has its memory now: a ``/dev/shm`` without room for
    it raises here, instead of a SIGBUS at the first write to a page it cannot back."""
    shm = SharedMemory(name, create=size > 0, size=size)
    resource_tracker.unregister(shm._name, "shared_memory")
    if size > 0:
        try:
            os.posix_fallocate(shm._fd, 0, size)
        except OSError as err:
            shm.close()
            os.unlink(_path(name))
            free = os.statvfs(SHM_DIR)
            raise OSError(  # short: a broken group's reason is cut at 200 characters
                err.errno,
                f"{SHM_DIR} has no room for {size:,} bytes of the gradient sums "
                f"({free.f_bavail * free.f_frsize:,} free): give it more (docker --shm-size) "
                "or lower RAYMODULE_ALLREDUCE_BUCKET_BYTES",
            ) from None
    return shm


class LocalGroup:
    """The co-located ranks of a gradient group, summing buckets through shared memory.

    ``index`` is this rank's place among the ``ranks`` (global ranks, ascending) whose
    processes are ``pids``; index 0 is the leader. The others find the leader's control
    segment through ``publish(name)`` and ``lookup()`` (the group's rendezvous store), or,
    without them, by its name, :func:`segment_prefix` of the leader's pid and ``token``, which
    every rank was given.
    """

    def __init__(
        self,
        ranks: list[int],
        pids: list[int],
        index: int,
        timeout_s: float,
        publish: Callable[[str], None] | None = None,
        lookup: Callable[[], str] | None = None,
        token: str | None = None,
    ):
        self.size, self.index, self.timeout_s = len(ranks), index, timeout_s
        self._rank = ranks[index]
        self._peers: list[_Peer] = []
        self._prefix = ""  # the leader's: the start of the names of the segments it creates
        self._segments: dict[str, SharedMemory] = {}  # name: mapped, linked or not
        self._linked: set[str] = set()  # of those, the ones this rank created and still links
        self._data: SharedMemory | None = None
        self._bytes: np.ndarray | None = None  # the data segment, as bytes
        self._slot_bytes = 0
        self._shared_bytes = 0  # the shared area's, after the slots
        self._number = 1  # the leader's: the number of the segment it created last
        self._seq = 0
        self._closed = False
        self._busy = threading.Lock()  # held while a thread uses the mapped memory
        self._slots = self._seqs = self._attached = None  # the control segment's, once mapped
        try:
            self._form(ranks, pids, publish, lookup, token or secrets.token_hex(4))
        except BaseException:
            self.close()  # the peers' descriptors, and the segments it made or mapped
            raise

    def _form(self, ranks: list[int], pids: list[int], publish, lookup, token: str) -> None:
        for i, (rank, pid) in enumerate(zip(ranks, pids)):
            if i != self.index:
                self._peers.append(_Peer(rank, pid))
        control_bytes = 8 * (_HEADER + 2 * self.size)
        if self.leader:
            remove_stale_segments()
            self._prefix = segment_prefix(pids[0], token)
            name = self._create(1, control_bytes)
            self._control = self._segments[name]
            if publish is not None:
                publish(name)
        elif lookup is not None:
            self._control = self._attach(lookup())
        else:
            self._control = self._attach_when_created(f"{segment_prefix(pids[0], token)}1")
        self._slots = np.ndarray((_HEADER + 2 * self.size,), np.int64, self._control.buf)
        self._seqs = self._slots[_HEADER : _HEADER + self.size]
        self._attached = self._slots[_HEADER + self.size :]
        self._attached[self.index] = 1
        if self.leader:
            self._unlink_when_attached(name, 1)

    @property
    def leader(self) -> bool:
        return self.index == 0

    def reserve(self, nbytes: int, shared_bytes: int = 0) -> None:
        """Makes each rank's data slot hold at least ``nbytes``, and the shared area at least
        ``shared_bytes``; all local ranks must call it with the same values."""
        if nbytes <= self._slot_bytes and shared_bytes <= self._shared_bytes:
            return
        with self._busy:
            if self._closed:  # a call queued before close() ran after it: it makes nothing
                raise RuntimeError("this node's shared-memory group is closed")
            try:
                self._reserve(max(nbytes, self._slot_bytes), max(shared_bytes, self._shared_bytes))
            except BaseException:
                self.abort()
                raise

    def _reserve(self, nbytes: int, shared_bytes: int) -> None:
        slot_bytes = -(-nbytes // ALIGN) * ALIGN
        shared_bytes = -(-shared_bytes // ALIGN) * ALIGN
        self._release_data()
        if self.leader:
            self._number += 1
            number = self._number
            name = self._create(number, slot_bytes * (self.size + 1) + shared_bytes)
            self._slots[_DATA_NUMBER] = number
        else:
            self._wait(lambda: self._slots[_DATA_NUMBER] > int(self._attached[self.index]))
            number = int(self._slots[_DATA_NUMBER])
            name = f"{self._control.name.rsplit('-', 1)[0]}-{number}"
            self._attach(name)
        self._data = self._segments[name]
        self._bytes = np.frombuffer(self._data.buf, np.uint8)
        self._slot_bytes, self._shared_bytes = slot_bytes, shared_bytes
        self._attached[self.index] = number
        if self.leader:
            self._unlink_when_attached(name, number)

    def part(self, count: int) -> tuple[int, int]:
        """This rank's part, ``[lo, hi)``, of ``count`` elements split over the local ranks in
        order: the part of a bucket it sums, of the arrays it shares."""
        return count * self.index // self.size, count * (self.index + 1) // self.size

    def sum(
        self, arrays: list[np.ndarray], dtype: np.dtype, after_sum=None, copy_out: bool = True
    ) -> np.ndarray:
        """Sums ``arrays`` (this rank's bucket, writable; together at most :meth:`reserve`'s
        bytes) over the local group in place (unless ``copy_out`` is False), as one flat
        array of ``dtype``. ``after_sum``, if given, is called by the leader on the local sum
        (a flat array) before anyone copies it out: the sum across nodes. Returns the sum's
        slot in the shared memory (a flat array); with ``copy_out`` False, ``arrays`` are left
        as they were and the caller reads the sum there, without writing it, until its next
        call on this group, at which every read of it must be over: the other ranks write the
        slot again once all are in."""
        with self._busy:
            return self._sum(arrays, np.dtype(dtype), after_sum, copy_out)

    def _sum(self, arrays: list[np.ndarray], dtype: np.dtype, after_sum, copy_out) -> np.ndarray:
        try:
            count = sum(a.size for a in arrays)
            slots = [self._flat(k, count, dtype) for k in range(self.size + 1)]
            for a, at in _pieces(arrays, 0, count):
                slots[self.index][at : at + a.size] = a
            self._barrier()
            lo, hi = self.part(count)
            _add(slots, lo, hi, slots[self.size][lo:hi])
            self._barrier()
            if after_sum is not None:
                if self.leader:
                    after_sum(slots[self.size])
                self._barrier()
            if copy_out:
                for a, at in _pieces(arrays, 0, count):
                    a[...] = slots[self.size][at : at + a.size]
            return slots[self.size]
        except BaseException:
            self.abort()
            raise

    def sum_and_update(
        self,
        arrays: list[np.ndarray],
        dtype: np.dtype,
        update: Callable[[int, int], None],
        groups: list[list[np.ndarray]],
    ) -> None:
        """Sums ``arrays`` (this rank's gradients, one bucket, as :meth:`sum`) and splits the
        update of the sum: this rank copies its :meth:`part` ``[lo, hi)`` of the sum into its
        ``arrays``, calls ``update(lo, hi)``, which updates that part of ``groups`` (each group
        the flat concatenation of its arrays, laid out as the bucket: the weights, their
        state), and shares it; then it takes the others' parts of ``groups`` and of the sum.

        A peer lost (or the group broken) at the second barrier raises :class:`PartlyUpdated`:
        if a rank never came, with the whole sum in ``arrays`` (the rest added here from the
        slots, in rank order as ever) for the caller to update the rest; if every rank came,
        after taking their parts (nothing is left to update). Lost before, or ``update``
        failing, it raises as :meth:`sum` does: the step is not applied on this rank.

        A rank that finds a peer missing has raised the broken flag first, and a barrier
        passes only if the flag is still down after every rank was seen in (each store
        followed by a fence before the loads after it): so no rank passes the second barrier
        once one has found a peer missing, and nobody writes a slot while it adds from them."""
        with self._busy:
            try:
                self._sum_and_update(arrays, np.dtype(dtype), update, groups)
            except BaseException:
                self.abort()
                raise

    def _sum_and_update(self, arrays, dtype: np.dtype, update, groups) -> None:
        count = sum(a.size for a in arrays)
        slots = [self._flat(k, count, dtype) for k in range(self.size + 1)]
        for a, at in _pieces(arrays, 0, count):
            slots[self.index][at : at + a.size] = a
        self._barrier()
        lo, hi = self.part(count)
        offset = (self.size + 1) * self._slot_bytes
        shared = []
        for group in groups:
            size = sum(a.size for a in group)
            shared.append(self._bytes[offset : offset + size * dtype.itemsize].view(dtype))
            offset += size * dtype.itemsize
        _add(slots, lo, hi, slots[self.size][lo:hi])
        for a, at in _pieces(arrays, lo, hi):
            a[...] = slots[self.size][at : at + a.size]
        update(lo, hi)  # failing here, this part may be half done: the step is not applied
        for group, flat in zip(groups, shared):
            for a, at in _pieces(group, lo, hi):
                flat[at : at + a.size] = a
        try:
            self._barrier()
        except Exception as err:
            self.abort()  # no rank passes the barrier from here on but one that saw all in
            if self._seqs.min() < self._seq:
                # Somebody never came: nobody passed, nobody writes a slot again. The rest of
                # the sum added here from the slots, for the caller to update the rest.
                for a, at in _pieces(arrays, 0, lo) + _pieces(arrays, hi, count):
                    _add(slots, at, at + a.size, a)
                raise PartlyUpdated(lo, hi, count, err) from err
            # every rank came (and shared its part): the step is whole, the group broken
            self._take(arrays, groups, shared, slots[self.size], lo, hi, count)
            raise PartlyUpdated(0, count, count, err) from err
        self._take(arrays, groups, shared, slots[self.size], lo, hi, count)

    @staticmethod
    def _take(arrays, groups, shared, summed, lo: int, hi: int, count: int) -> None:
        """The others' parts of ``groups`` and of the sum, out of the shared memory."""
        for a, at in _pieces(arrays, 0, lo) + _pieces(arrays, hi, count):
            a[...] = summed[at : at + a.size]
        for group, flat in zip(groups, shared):
            for a, at in _pieces(group, 0, lo) + _pieces(group, hi, count):
                a[...] = flat[at : at + a.size]

    def share_port(self, port: int | None = None) -> int:
        """The leader's ``port``, given to every local rank (the others call this without
        one and wait for it): the rendezvous of a group over the network, made later."""
        with self._busy:
            try:
                if self.leader:
                    self._slots[_PORT] = port
                else:
                    self._wait(lambda: self._slots[_PORT] != 0)
                return int(self._slots[_PORT])
            except BaseException:
                self.abort()
                raise

    def abort(self) -> None:
        """Tells the local peers that the group is broken: their waits raise."""
        if not self._closed and self._slots is not None and not self._slots[_BROKEN]:
            self._slots[_BROKEN] = self._rank + 1
            _fence()

    def close(self) -> None:
        """Aborts, unlinks what this rank still links, and unmaps every segment; idempotent.
        A sum still running in another thread sees the broken flag within a millisecond and
        ends; one still in its sum across nodes (gloo, bounded by the collective timeout)
        keeps the memory mapped until it ends, and the garbage collector unmaps it (and closes
        the peers' descriptors); so do arrays over a sum (``sum``'s ``copy_out`` False) that
        MXNet still reads."""
        if self._closed:
            return
        self.abort()
        self._closed = True
        for name in list(self._linked):
            self._unlink(name)
        if not self._busy.acquire(timeout=_CLOSE_WAIT_S):
            return
        try:
            self._release_data()
            self._slots = self._seqs = self._attached = None
            for name in list(self._segments):
                self._release(name)
            for peer in self._peers:
                peer.close()
        finally:
            self._busy.release()

    def _flat(self, slot: int, count: int, dtype: np.dtype) -> np.ndarray:
        start = slot * self._slot_bytes
        return self._bytes[start : start + count * dtype.itemsize].view(dtype)

    def _barrier(self) -> None:
        self._seq += 1
        self._seqs[self.index] = self._seq
        _fence()  # seen before this rank looks at the broken flag (see _wait)
        self._wait(lambda: self._seqs.min() >= self._seq)

    def _wait(self, done: Callable[[], bool]) -> None:
        """Returns once ``done()``; raises if the group is broken, a local peer dies, or the
        collective timeout passes first. Yields the CPU while it waits, sleeping longer (up to
        0.2 ms) the longer the wait."""
        start = time.monotonic()
        checked = start
        while True:
            broken = int(self._slots[_BROKEN])
            # the flag read again after done(): a rank that raised it and then found a peer
            # missing (abort's fence orders the two) sees no rank pass, even one that came late
            if not broken and done() and not self._slots[_BROKEN]:
                return
            now = time.monotonic()
            if broken or now - checked >= _CHECK_INTERVAL_S:
                checked = now
                for peer in self._peers:
                    if peer.dead():
                        raise RuntimeError(
                            f"rank {peer.rank} (pid {peer.pid}) on this node died during a "
                            "shared-memory gradient sum"
                        )
                if broken:
                    raise RuntimeError(
                        f"rank {broken - 1} broke this node's shared-memory group (it failed "
                        "or left)"
                    )
                if now - start > self.timeout_s:
                    raise TimeoutError(
                        f"no shared-memory barrier from the local peers in {self.timeout_s:g} s"
                    )
            waited = now - start
            if waited < 1e-4:
                os.sched_yield()
            else:
                time.sleep(min(waited / 10, 2e-4))

    def _create(self, number: int, size: int) -> str:
        name = f"{self._prefix}{number}"
        self._segments[name] = _segment(name, size)
        self._linked.add(name)
        return name

    def _attach_when_created(self, name: str) -> SharedMemory:
        """Attaches the segment ``name`` once the leader created and sized it; raises if the
        leader dies or the collective timeout passes first."""
        start = time.monotonic()
        while True:
            try:  # empty: created, not yet sized (shm_open, then ftruncate)
                if os.stat(_path(name)).st_size > 0:
                    return self._attach(name)
            except FileNotFoundError:
                pass
            if self._peers[0].dead():
                raise RuntimeError(
                    f"rank {self._peers[0].rank} (pid {self._peers[0].pid}), this node's "
                    "leader, died before it made the group's shared memory"
                )
            if time.monotonic() - start > self.timeout_s:
                raise TimeoutError(
                    f"this node's leader made no shared memory {name} in {self.timeout_s:g} s"
                )
            time.sleep(_CHECK_INTERVAL_S)

    def _attach(self, name: str) -> SharedMemory:
        self._segments[name] = _segment(name)
        return self._segments[name]

    def _unlink_when_attached(self, name: str, number: int) -> None:
        try:
            self._wait(lambda: self._attached.min() >= number)
        finally:
            self._unlink(name)

    def _unlink(self, name: str) -> None:
        if name in self._linked:
            self._linked.discard(name)
            try:  # not SharedMemory.unlink: it unregisters from the tracker a second time
                os.unlink(_path(name))
            except FileNotFoundError:
                pass

    def _release_data(self) -> None:
        if self._data is not None:
            self._bytes = None
            self._release(self._data.name)
            self._data = None
            self._slot_bytes = self._shared_bytes = 0

    def _release(self, name: str) -> None:
        self._unlink(name)
        segment = self._segments.pop(name)
        try:
            segment.close()
        except BufferError:
            # Views of it still live (an exception's frame, or MXNet arrays over the sums
            # that kernels still read): the mapping goes with the last of them. Its descriptor
            # is closed now, and the segment let go, so that nothing tries to close it again.
            os.close(segment._fd)
            segment._fd, segment._mmap = -1, None
