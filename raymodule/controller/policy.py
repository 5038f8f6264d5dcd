"""Elastic training's decisions, as pure functions of what was observed.

The policies decide; the controller (:mod:`.actor`) acts. Nothing here
talks to Ray or to storage, so every rule is tested on plain values.

A *failure* is one event in which workers were lost together: a killed process, a lost node
with every worker it held, a worker evicted for being too slow. ``max_failures`` counts these
events, so one lost node costs one failure however many workers it ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "Action",
    "Decision",
    "Limits",
    "Loss",
    "on_loss",
    "after_wait",
    "to_admit",
    "rebalanced",
]

#: how far one adjustment of ``work_load_list="auto"`` moves a worker's weight, relative
MAX_WEIGHT_CHANGE = 0.25
#: the least gain in the slowest worker's compute time per step that an adjustment must bring
MIN_BALANCE_GAIN = 0.05


@dataclass(frozen=True)
class Limits:
    """A run's elastic limits (from :class:`raymodule.RunConfig`), for ``configured`` contexts.

    ``elastic`` is False outside a run (``fit`` without ``run=``, the intermediate API): a lost
    worker then ends the call with one clear error. ``max_reforms``: times in a row the group
    may break with no worker lost (a member late, not gone) before its slowest member is
    treated as lost (``RAYMODULE_MAX_REFORMS``).
    """

    configured: int
    min_workers: int | None = None
    max_failures: int = 3
    elastic: bool = True
    max_reforms: int = 2

    @property
    def floor(self) -> int:
        """Workers below which training waits for more: ``min_workers``, or every context."""
        return (
            self.configured if self.min_workers is None else min(self.min_workers, self.configured)
        )


@dataclass(frozen=True)
class Loss:
    """What a failed call showed: the workers that survived it and those lost in it, the
    failures over the run before it, how many times in a row (this one included) the group
    broke with no worker lost, and whether it came in the middle of a Ray Dataset's pass
    (whose members' splits cannot be re-split before it ends)."""

    survivors: int
    lost: int
    failures_before: int
    broken_in_a_row: int = 0
    mid_pass: bool = False


_MID_PASS = (
    "a Ray Dataset's pass cannot be re-split among other workers before it ends: the run "
    "restarts from its latest checkpoint"
)


class Action(Enum):
    CONTINUE = "continue"  # re-form the group among the survivors and re-run the failed step
    WAIT = "wait"  # too few survivors: wait (bounded) for replacements, then continue
    RESTART = "restart"  # nobody survived: start every worker again from the latest checkpoint
    EVICT = "evict"  # the group keeps breaking with nobody lost: its slowest member is lost
    FAIL = "fail"  # stop the run with ``Decision.reason``


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""


def on_loss(limits: Limits, loss: Loss) -> Decision:
    """What to do when a call failed because ``loss.lost`` workers were lost, or (``lost`` 0)
    because the group broke. RESTART means going on from storage, which the caller reads only
    then; with no checkpoint there the run fails."""
    if not limits.elastic:
        return Decision(
            Action.FAIL,
            "a lost worker ends a call outside an elastic run; pass "
            "fit(..., run=raymodule.RunConfig(...)) to train on through losses",
        )
    if loss.lost == 0:
        if loss.mid_pass:  # the failed steps' rows were read from the streams: gone
            return Decision(Action.RESTART, _MID_PASS)
        if loss.broken_in_a_row > limits.max_reforms:
            return Decision(
                Action.EVICT,
                f"the group broke {loss.broken_in_a_row} times in a row with no worker lost, "
                f"more than RAYMODULE_MAX_REFORMS={limits.max_reforms}: its slowest member is "
                "treated as lost",
            )
        return Decision(Action.CONTINUE)
    failures = loss.failures_before + 1
    if limits.max_failures >= 0 and failures > limits.max_failures:
        return Decision(
            Action.FAIL,
            f"{failures} failures over the run, more than RunConfig.max_failures="
            f"{limits.max_failures} (raise it, or -1 for no limit)",
        )
    if loss.survivors == 0:
        return Decision(Action.RESTART)
    if loss.mid_pass:
        return Decision(Action.RESTART, _MID_PASS)
    if loss.survivors < limits.floor:
        return Decision(Action.WAIT)
    return Decision(Action.CONTINUE)


def on_leave(limits: Limits, survivors: int, mid_pass: bool = False) -> Decision:
    """What to do when members asked to leave (SIGTERM: a preemption notice, a node drained)
    and ``survivors`` would remain (``mid_pass``: in the middle of a Ray Dataset's pass).
    Leaving is no failure: no step failed, no state is lost."""
    if not limits.elastic:
        return Decision(
            Action.FAIL,
            "a worker that is shut down ends a call outside an elastic run; pass "
            "fit(..., run=raymodule.RunConfig(...)) to train on through it",
        )
    if survivors == 0:
        return Decision(Action.RESTART)
    if mid_pass:
        return Decision(Action.RESTART, _MID_PASS)
    if survivors < limits.floor:
        return Decision(Action.WAIT)
    return Decision(Action.CONTINUE)


def after_wait(limits: Limits, live: int, waited_s: float) -> Decision:
    """Whether training goes on after waiting ``waited_s`` for replacements, with ``live``
    workers (survivors and replacements that came up)."""
    if live >= limits.floor:
        return Decision(Action.CONTINUE)
    if limits.min_workers is not None:
        floor = f"RunConfig.min_workers={limits.min_workers}"
    else:
        floor = f"the {limits.configured} contexts (RunConfig.min_workers=None)"
    return Decision(
        Action.FAIL,
        f"{live} workers left after waiting {waited_s:.0f} s for more, fewer than {floor}; "
        "lower min_workers, add nodes, or raise RAYMODULE_MIN_WORKERS_WAIT_S",
    )


def to_admit(configured: int, live: int, ready: int) -> int:
    """Replacement workers to admit at a step boundary: those ready, up to the contexts."""
    return max(0, min(ready, configured - live))


def rebalanced(
    weights: list[float],
    seconds_per_sample: list[float],
    max_change: float = MAX_WEIGHT_CHANGE,
    min_gain: float = MIN_BALANCE_GAIN,
) -> list[float] | None:
    """``work_load_list="auto"``: the members' next weights, from their current ``weights`` and
    the compute seconds each spent per sample (forward, backward and update, without waiting
    for the others in the gradient sum). The step's pace is its slowest member's compute time,
    ``weight * seconds_per_sample`` (its share of the global batch is its weight's); the
    weights move toward each member's speed, each by at most ``max_change`` of its value, and
    keep their mean at 1. None (nothing moves) unless the slowest member's time falls by at
    least ``min_gain``: noise in the timings does not shuffle work back and forth."""
    if len(weights) < 2 or any(s <= 0 for s in seconds_per_sample):
        return None
    speeds = [1.0 / s for s in seconds_per_sample]
    total = sum(weights)
    target = [total * speed / sum(speeds) for speed in speeds]
    moved = [
        min(max(goal, w * (1 - max_change)), w * (1 + max_change))
        for w, goal in zip(weights, target, strict=True)
    ]
    scale = len(moved) / sum(moved)
    moved = [w * scale for w in moved]
    pace = max(w / total * s for w, s in zip(weights, seconds_per_sample, strict=True))
    new_pace = max(w / sum(moved) * s for w, s in zip(moved, seconds_per_sample, strict=True))
    if new_pace > pace * (1 - min_gain):
        return None
    return moved
