"""What jobs/benchmark.py measures besides samples/s: in a configuration's process, the
checkpoints raymodule logs, the bytes fit sends its workers and a bare gloo allreduce's time;
in the parent, the checkpoints a run should take and a process's CPU seconds (the S3
server's; jobs/scaling.py's too). And the barrier the two ``apart`` processes meet at.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
from workload import gradient_size


def checkpoints_per_epoch(every, warmup):
    """Checkpoints fit takes per epoch of `warmup` batches: at each multiple of `every` that
    another batch follows, plus the one at the epoch's end."""
    return (warmup - 1) // every + 1 if every else 1


class CheckpointLog(logging.Handler):
    """Notes, with perf_counter times, what raymodule.checkpoint logs: commits and skips."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.events = []  # (perf_counter, "committed" | "skipped" | "failed", seconds or None)

    def emit(self, record):
        now, msg = time.perf_counter(), str(record.msg)
        if msg.startswith("checkpoint %s committed in"):
            self.events.append((now, "committed", float(record.args[1])))
        elif " skipped: " in msg:
            self.events.append((now, "skipped", None))
        elif msg.startswith("checkpoint at step %d failed"):
            self.events.append((now, "failed", None))

    def summary(self, marks, spec):
        start, end = marks[0], marks[-1]
        timed = [kind for t, kind, _ in self.events if start <= t <= end]
        seconds = [s for _, kind, s in self.events if kind == "committed"]
        epochs = len(marks) - 1
        return {
            "every": spec["checkpoint_every"],
            "taken": epochs * checkpoints_per_epoch(spec["checkpoint_every"], spec["warmup"]),
            "window_s": end - start,
            **{kind: timed.count(kind) for kind in ("committed", "skipped", "failed")},
            "commit_s": seconds,  # every commit of the fit, warm-up and final one included
        }


def array_bytes(value):
    """Bytes of the numpy arrays in `value`, through lists, tuples, dicts and raymodule's
    Batch (its data and label): a payload's size without pickle framing or object refs."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(array_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(array_bytes(v) for v in value.values())
    if hasattr(value, "data") and hasattr(value, "label"):  # raymodule.data.Batch
        return array_bytes(value.data) + array_bytes(value.label)
    return 0


class DataBytes:
    """Counts, in the client process, the data raymodule's fit sends its workers: wraps
    ray.put (noting the bytes of the arrays put and which module put them) and
    ControllerHandle.run (noting the bytes of a DatasetIter's index arrays, which travel in
    the plans the controller runs, not through ray.put)."""

    def __init__(self, ray, raymodule):
        self.puts = []  # (perf_counter, module that called ray.put, array bytes)
        self.plans = []  # (index array bytes: all workers' slices, steps)
        put, run = ray.put, raymodule.handle.ControllerHandle.run

        def counted_put(value, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            self.puts.append((time.perf_counter(), caller, array_bytes(value)))
            return put(value, *args, **kwargs)

        def counted_run(handle, kind, plan, *args, **kwargs):
            self.plans.append((array_bytes(plan["indices"]), len(plan["indices"])))
            return run(handle, kind, plan, *args, **kwargs)

        ray.put = counted_put
        raymodule.handle.ControllerHandle.run = counted_run

    def summary(self, marks, steps, workers):
        """Bytes per worker per timed step (the samples put by raymodule.steps, or a
        DatasetIter's indices), and those put once by raymodule.data (a dataset's arrays)."""
        start, end = marks[0], marks[-1]
        timed = [(who, n) for t, who, n in self.puts if start <= t <= end]
        samples = sum(n for who, n in timed if who == "raymodule.steps")
        planned = sum(steps for _, steps in self.plans)
        indices = sum(n for n, _ in self.plans) / planned * steps if planned else 0
        return {
            "per_worker_step": (samples + indices) / steps / workers,
            "samples_per_worker_step": samples / steps / workers,
            "indices_per_worker_step": indices / steps / workers,
            "other_puts_timed": sum(n for who, n in timed if who != "raymodule.steps"),
            "dataset_once": sum(n for _, who, n in self.puts if who.startswith("raymodule.data")),
        }


def gloo_floor(mx, model):
    """ms per gloo allreduce of the model's whole gradient between 2 processes: the floor of
    what raymodule x2 pays per step for its exchange (torch.distributed, 127.0.0.1)."""
    import datetime

    import torch
    import torch.distributed as dist

    numel = gradient_size(mx, model)
    rank = int(os.environ["GLOO_RANK"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['GLOO_PORT']}",
        world_size=2,
        rank=rank,
        timeout=datetime.timedelta(seconds=60),
    )
    grad = torch.ones(numel)
    for _ in range(10):
        dist.all_reduce(grad)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(100):
        dist.all_reduce(grad)
    elapsed = (time.perf_counter() - start) / 100
    dist.destroy_process_group()
    return numel * 4, elapsed


class PairBarrier:
    """A barrier of the two `apart` processes over one TCP connection on 127.0.0.1: rank 0
    listens on `port`, rank 1 connects; each call sends a byte and waits for the other's."""

    def __init__(self, rank, port, timeout=60.0):
        deadline = time.monotonic() + timeout
        if rank == 0:
            with socket.create_server(("127.0.0.1", port)) as server:
                server.settimeout(timeout)
                self.sock = server.accept()[0]
        else:
            while True:
                try:
                    self.sock = socket.create_connection(("127.0.0.1", port), timeout=1.0)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        self.sock.settimeout(timeout)

    def __call__(self):
        self.sock.sendall(b"x")
        if not self.sock.recv(1):
            raise ConnectionError("the other apart process is gone")


def cpu_seconds(pid):
    """CPU seconds (user + system) process `pid` has used so far, or None (no `pid`, or no
    Linux /proc)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
