"""Elastic training's decisions, as pure functions of what was observed.

The policies decide; :class:`raymodule.workerset.WorkerSet` and the controller act. Nothing here
talks to Ray, so every rule is tested on plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Action", "Decision", "Limits", "Loss", "on_loss", "after_wait", "to_admit"]


@dataclass(frozen=True)
class Limits:
    """A run's elastic limits (from :class:`raymodule.RunConfig`), for ``configured`` contexts.

    ``elastic`` is False outside a run (``fit`` without ``run=``, the intermediate API): a lost
    worker then ends the call with one clear error.
    """

    configured: int
    min_workers: int | None = None
    max_failures: int = 3
    elastic: bool = True

    @property
    def floor(self) -> int:
        """Workers below which training waits for more: ``min_workers``, or every context."""
        return (
            self.configured if self.min_workers is None else min(self.min_workers, self.configured)
        )


@dataclass(frozen=True)
class Loss:
    """What a failed step showed: workers that survived and that were lost in it, lost
    workers over the run before it, and whether a committed checkpoint exists to restart from."""

    survivors: int
    lost: int
    lost_before: int
    has_checkpoint: bool


class Action(Enum):
    CONTINUE = "continue"  # re-form the group among the survivors and re-run the failed step
    WAIT = "wait"  # too few survivors: wait (bounded) for replacements, then continue
    RESTART = "restart"  # nobody survived: start every worker again from the latest checkpoint
    FAIL = "fail"  # stop the run with ``Decision.reason``


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""


def on_loss(limits: Limits, loss: Loss) -> Decision:
    """What to do when ``loss.lost`` workers were lost in a step."""
    if not limits.elastic:
        return Decision(
            Action.FAIL,
            "a lost worker ends a call outside an elastic run; pass "
            "fit(..., run=raymodule.RunConfig(...)) to train on through losses",
        )
    total = loss.lost_before + loss.lost
    if limits.max_failures >= 0 and total > limits.max_failures:
        return Decision(
            Action.FAIL,
            f"{total} workers lost over the run, more than RunConfig.max_failures="
            f"{limits.max_failures} (raise it, or -1 for no limit)",
        )
    if loss.survivors == 0:
        if loss.has_checkpoint:
            return Decision(Action.RESTART)
        return Decision(
            Action.FAIL,
            "every worker was lost before the run committed a checkpoint to restart from",
        )
    if loss.survivors < limits.floor:
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
