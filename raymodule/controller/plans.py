"""What ties a plan (:meth:`.actor.Controller.run`) to the client beside its stream of
replies: the flag that asks it to stop, and the references it made for the client."""

from __future__ import annotations

from ray.experimental import internal_kv

__all__ = ["STOP_POLL_S", "Handed", "plan_ended", "preempted", "stop_asked", "stop_plan"]

_NAMESPACE = "raymodule-plans"  # the namespace of the plans' stop flags in Ray's key-value store
# plans whose references the controller keeps for the client: a callback may run plans (score,
# predict) while the client has not read all of a training plan's replies yet
_KEPT = 3
STOP_POLL_S = 1.0
"""How often a client waiting for the controller's reply (a plan's, or a chunk's call's)
asks whether SIGTERM came, and a controller waiting for replacements looks at the stop flag
of the call under way."""


def stop_plan(key: str, preempted: bool = False) -> None:
    """Asks the controller running the plan of ``stop_key`` ``key`` to stop it at its next
    chunk boundary (a flag in Ray's key-value store: the controller's calls to its workers go on
    undisturbed, which ``ray.cancel`` would interrupt); :func:`plan_ended` removes it.
    ``preempted``: SIGTERM asks it, which also ends a wait for replacements below the floor
    (the run checkpoints and stops; see :func:`preempted`). The key of a chunk's call to the
    controller is flagged the same way."""
    flag = b"preempted" if preempted else b"stop"
    internal_kv._internal_kv_put(key, flag, namespace=_NAMESPACE)


def plan_ended(key: str) -> None:
    """Removes the stop flag of the plan of ``stop_key`` ``key`` (asked for or not)."""
    internal_kv._internal_kv_del(key, namespace=_NAMESPACE)


def stop_asked(key: str) -> bool:
    """Whether :func:`stop_plan` asked the plan of ``stop_key`` ``key`` to stop."""
    return internal_kv._internal_kv_exists(key, namespace=_NAMESPACE)


def preempted(key: str) -> bool:
    """Whether :func:`stop_plan` asked it because of SIGTERM (``preempted``)."""
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
