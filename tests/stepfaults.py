"""Faults keyed to a worker's own training step, never to the client's trailing callback.

The client's ``batch_end_callback`` trails the workers by the batches in flight (up to
``(1 + RAYMODULE_PIPELINE_DEPTH) * RAYMODULE_STEPS_PER_CALL``), so a fault fired from it lands
wherever the workers happen to be. Here the worker fires it itself, as it is about to run a
training step:

    cls = worker_class({(19, 1): "die"}, marks=tmp_path)   # rank 1, before its 20th step
    monkeypatch.setattr(raymodule.module, "ControllerHandle", with_workers(cls))

``plan[(step, rank)]`` is a fault or a list of them, fired by the worker of that rank (None:
every rank) once it applied ``step`` training steps (as restored from a peer or a checkpoint,
so a step run again after a loss does not fire again):

- ``"die"``: SIGKILL its own process; ``"stop"``: SIGSTOP it; ``"term"``: SIGTERM it (Ray's
  graceful shutdown, a preemption notice); ``"raise"``: raise an error of its own in the step
  (a bad batch);
- ``("signal", pid, signum)``: send another process (the training process) a signal;
- ``("hog", gib)``: take memory, 128 MiB at a time up to ``gib`` GiB, until its node's Ray
  kills the process for it (its memory monitor); an error of its own if it still lives
  :data:`HOG_HOLD_S` after that;
- ``("arm", method, how)``: its next call of ``method`` (``get_params``; ``applied``;
  ``leave``, the controller's in a re-form) does ``how`` ("die" or "stop") at its start;
  ``("arm", "share", how)`` does it in its next split update (sum and update in parts),
  once it updated its part, before it shares it; ``("arm", "rows", "raise")``: its next
  call's rows cannot be read (an error of its own, before any of the call's steps);
- ``("gate", name)``: hand the step to the test and wait: the worker marks the gate reached and
  goes on once the test acted and opened it (:class:`Gates`), at most :data:`GATE_WAIT_S`.
  Put a gate on every rank (None) and the whole group stands still at the start of the step,
  with nobody inside a collective, for as long as the test's action takes. The controller
  waits for the workers meanwhile: an action cannot call it; :func:`workers_up` tells when
  workers on added nodes are up.

Each fault fires once per rank and run: a marker file in ``marks`` remembers it across the
worker processes a run restarts.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import ray

from raymodule.handle import ControllerHandle
from raymodule.worker import ModuleWorker

GATE_WAIT_S = 180.0  # the longest a gated worker waits for the test to act
HOG_HOLD_S = 10.0  # how long a worker holds the most memory it takes, waiting to be killed

_SIGNALS = {"die": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}


def worker_class(plan: dict, marks) -> type:
    """A real :class:`ModuleWorker` that fires ``plan`` (see the module's docstring); a class
    made here travels to the workers by value, with its plan."""
    marks = str(marks)
    plan = {key: faults if isinstance(faults, list) else [faults] for key, faults in plan.items()}
    # by value: a test run as a script, or on a cluster's nodes, has no tests/ to import from
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class StepFaultWorker(ModuleWorker):
        _rank = 0
        _armed: dict = {}
        _shared = False

        def __init__(self, *args):
            super().__init__(*args)
            # ready to join a group across nodes, as describe() makes it there
            from raymodule.worker import collective, process_group  # noqa: F401

        def describe(self, grouped: bool = True) -> dict:
            # up once the controller has its answer (but for the reply on its way): a
            # replacement the test waits for is admitted at the controller's next look
            where = super().describe(grouped)
            Path(marks, f"up-{os.getpid()}").touch()
            return where

        def join(self, world_size, rank, address, backend, timeout_s, generation, place):
            self._rank = rank
            super().join(world_size, rank, address, backend, timeout_s, generation, place)
            reduce_and_update = self._collective.reduce_and_update

            def armed(grads, update, groups):
                if not self._shared:  # noted once: the update was split in this process
                    Path(marks, f"shared-{os.getpid()}").touch()
                    self._shared = True

                def update_then_fault(lo, hi):
                    update(lo, hi)
                    self._armed_fault("share")

                reduce_and_update(grads, update_then_fault, groups)

            self._collective.reduce_and_update = armed
            reduce_shared = self._collective.reduce_shared

            def noted(grads):
                Path(marks, f"sums-{os.getpid()}").touch()  # the update read the shared sums
                return reduce_shared(grads)

            self._collective.reduce_shared = noted

        def train_step(self, mid, batch):
            step = self._applied
            faults = plan.get((step, self._rank), []) + plan.get((step, None), [])
            if faults and _first_time(marks, step, self._rank):
                for fault in faults:
                    self._fire(fault)
            return super().train_step(mid, batch)

        def _fire(self, fault) -> None:
            if fault == "raise":
                raise ValueError(f"a bad batch at step {self._applied}")
            if isinstance(fault, str):
                os.kill(os.getpid(), _SIGNALS[fault])
            elif fault[0] == "signal":
                os.kill(fault[1], fault[2])
            elif fault[0] == "hog":
                _hog(fault[1])
            elif fault[0] == "arm":
                self._armed = {**self._armed, fault[1]: fault[2]}
            elif fault[0] == "gate":
                Path(marks, f"{fault[1]}.reached").touch()
                done = Path(marks, f"{fault[1]}.done")
                deadline = time.monotonic() + GATE_WAIT_S
                while not done.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            else:
                raise ValueError(f"unknown fault {fault!r}")

        def _armed_fault(self, method: str) -> None:
            how = self._armed.get(method)
            if how is not None:
                self._armed = {m: h for m, h in self._armed.items() if m != method}
                if how == "raise":
                    raise ValueError(f"rows unreadable after step {self._applied}")
                os.kill(os.getpid(), _SIGNALS[how])

        def _batches(self, batches, plan):
            self._armed_fault("rows")
            return super()._batches(batches, plan)

        def get_params(self, mid):
            self._armed_fault("get_params")
            return super().get_params(mid)

        def applied(self):
            self._armed_fault("applied")
            return super().applied()

        def leave(self, generation=None):
            if generation is not None:  # the controller's call in a re-form, not its own
                self._armed_fault("leave")
            super().leave(generation)

    return StepFaultWorker


def _hog(gib: float) -> None:
    held, chunk = [], 128 * 2**20
    for _ in range(int(gib * 2**30) // chunk):
        held.append(bytearray(b"\x01") * chunk)  # written: resident, as a model's arrays are
        time.sleep(0.01)  # the monitor looks every memory_monitor_refresh_ms
    time.sleep(HOG_HOLD_S)
    raise MemoryError(f"took {gib:g} GiB and was not killed for it")


def with_workers(cls: type):
    """A stand-in for ``raymodule.module.ControllerHandle`` that creates workers from ``cls``."""
    return lambda contexts, **kw: ControllerHandle(contexts, cls, **kw)


def workers_up(marks) -> int:
    """How many workers of :func:`worker_class` ever came up (their imports done) and told
    the controller where they run (``describe``)."""
    return len(list(Path(marks).glob("up-*")))


def split_updates(marks) -> int:
    """How many worker processes of :func:`worker_class` shared the parts of a split update."""
    return len(list(Path(marks).glob("shared-*")))


def shared_sums(marks) -> int:
    """How many worker processes of :func:`worker_class` updated from sums read in the shared
    memory (``Collective.reduce_shared``)."""
    return len(list(Path(marks).glob("sums-*")))


def fired(marks, step: int, rank: int) -> bool:
    """Whether the worker of ``rank`` fired its faults of ``step``."""
    return Path(marks, f"fired-{step}-{rank}").exists()


class Gates:
    """The test's side of the gates: a thread that, once a worker reached gate ``name``, runs
    ``actions[name]()`` and then opens the gate. ``fired`` counts the actions run; an action's
    exception is kept in ``errors``. Use as a context manager: on exit every gate opens and no
    action runs any more, but the thread lives on, idle, as long as the process: a process an
    action started (a Ray node's raylet) is bound to the thread that started it (Ray sets
    PR_SET_PDEATHSIG), and would die with it."""

    def __init__(self, marks, actions: dict):
        self.marks, self.actions = Path(marks), actions
        self.fired = {name: 0 for name in actions}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="gates")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for name in self.actions:  # no worker may be left waiting at a gate
            (self.marks / f"{name}.done").touch()

    def _watch(self) -> None:
        pending = dict(self.actions)
        while not self._stop.wait(0.01):
            for name in [n for n in pending if (self.marks / f"{n}.reached").exists()]:
                action = pending.pop(name)
                try:
                    action()
                except Exception:  # noqa: BLE001 - reported to the test
                    self.errors.append(traceback.format_exc())
                self.fired[name] += 1
                (self.marks / f"{name}.done").touch()
        threading.Event().wait()  # idle until the process ends (see the class's docstring)


def _first_time(marks: str, step: int, rank: int) -> bool:
    try:
        os.close(os.open(os.path.join(marks, f"fired-{step}-{rank}"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True
