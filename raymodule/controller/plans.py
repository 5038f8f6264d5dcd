"""What ties a plan (:meth:`.actor.Controller.run`) to the client beside its stream of
replies: the flag that asks it to stop, and the references it made for the client; and the
run's flag, which SIGTERM asks (:meth:`.actor.Controller.configure`)."""

from __future__ import annotations

import uuid

from ray.experimental import internal_kv

__all__ = ["STOP_POLL_S", "Handed", "StopFlag", "forget", "preempted", "stop_asked"]

_NAMESPACE = "raymodule-plans"  # the namespace of the plans' stop flags in Ray's key-value store
# plans whose references the controller keeps for the client: a callback may run plans (score,
# predict) while the client has not read all of a training plan's replies yet
_KEPT = 3
STOP_POLL_S = 1.0
"""How often a client waiting for the controller's reply during an elastic run asks whether
SIGTERM came, and a controller waiting for replacements looks at the stop flags."""


class StopFlag:
    """The client's flag that asks the controller to stop the plan of ``stop_key`` ``key`` at
    its next chunk boundary, or, a run's (:meth:`.actor.Controller.configure`), to stop waiting
    for replacements in any call: an entry in Ray's key-value store, so the controller's calls
    to its workers go on undisturbed (``ray.cancel`` would interrupt them). Once asked it stays
    asked until :meth:`clear`, when the plan or the run ended."""

    def __init__(self):
        self.key = uuid.uuid4().hex
        self.asked = self.preempted = False

    def ask(self, preempted: bool = False) -> None:
        """Asks it to stop. ``preempted``: SIGTERM asks it, which also ends a wait for
        replacements below the floor (the run checkpoints and stops; see :func:`preempted`);
        a plain stop asked before becomes one."""
        if self.asked and (self.preempted or not preempted):
            return
        self.asked, self.preempted = True, preempted
        flag = b"preempted" if preempted else b"stop"
        internal_kv._internal_kv_put(self.key, flag, namespace=_NAMESPACE)

    def clear(self) -> None:
        """Removes the flag, if it was asked: the plan or the run ended."""
        if self.asked:
            self.asked = self.preempted = False
            forget(self.key)


def stop_asked(key: str) -> bool:
    """Whether the client asked the plan of ``stop_key`` ``key`` to stop (:class:`StopFlag`)."""
    return internal_kv._internal_kv_exists(key, namespace=_NAMESPACE)


def forget(key: str) -> None:
    """Removes the flag of ``key``, if there is one: its plan ended (a client whose reading of
    it was interrupted never clears it)."""
    internal_kv._internal_kv_del(key, namespace=_NAMESPACE)


def preempted(key: str) -> bool:
    """Whether it asked because of SIGTERM (:meth:`StopFlag.ask`'s ``preempted``)."""
    return internal_kv._internal_kv_get(key, namespace=_NAMESPACE) == b"preempted"


class Handed:
    """References the latest plans made for the client (a checkpoint's snapshot, the
    parameters at a plan's end), by plan and by what and after how many training steps,
    until the client takes them; those of all but the latest ``_KEPT`` plans are let go."""

    def __init__(self):
        self._by_plan: dict[str, dict[tuple, object]] = {}

    def of(self, plan: str) -> dict[tuple, object]:
        """Where a plan keeps its references: ``{(what, steps): reference}``; the plans
        started before the latest ``_KEPT`` are let go."""
        handed = self._by_plan.setdefault(plan, {})
        while len(self._by_plan) > _KEPT:  # the oldest's replies were read long since
            self._by_plan.pop(next(iter(self._by_plan)))
        return handed

    def take(self, plan: str, what: str, steps: int):
        """The reference, given up; None if the plan made none (or it was let go)."""
        return self._by_plan.get(plan, {}).pop((what, steps), None)
