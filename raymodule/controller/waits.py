"""How long the controller waits, and what a call's outcome says.

Every wait for workers is bounded by these, all derived from ``RAYMODULE_*`` settings
(:mod:`raymodule.constants`); the client bounds its calls to the controller by
:func:`longest_call_s`.
"""

from __future__ import annotations

import time

import ray

from ..constants import Settings
from ..errors import GroupBrokenError, RayModuleError, WorkerError, first_line

__all__ = [
    "ACTOR_LOST", "silence_s", "forming_s", "longest_call_s", "await_calls", "settle_outcomes",
    "call_outcome", "classify_outcomes", "why_lost", "in_words",
]  # fmt: skip

# what a call to an actor whose process is gone raises: its death (a RayActorError), or, when
# Ray's memory monitor killed it, an OutOfMemoryError, which is no RayActorError
ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)


def silence_s(settings: Settings) -> float:
    """How long after a peer's collective failed a member may still be busy before it is lost
    (silent): a member may reach the collective up to one collective timeout after its peers
    (its own step took longer, or its process was not scheduled), and then waits up to one
    collective timeout for the peer that is gone."""
    return 2 * settings.collective_timeout_s


def forming_s(settings: Settings) -> float:
    """The longest a re-forming may take: leaving, the rendezvous, then joining (twice the
    collective timeout), each bounded by the collective timeout."""
    return 4 * settings.collective_timeout_s


def longest_call_s(settings: Settings, slots: int) -> float:
    """The longest one controller call may take: a call to the workers, then recoveries (at
    most one per worker, and the re-formings with nobody lost the policy allows), each
    settling the calls in flight, waiting for replacements and re-forming."""
    recovery = silence_s(settings) + settings.min_workers_wait_s + forming_s(settings)
    recoveries = slots + settings.max_reforms + 1
    return settings.call_timeout_s + recoveries * (recovery + settings.call_timeout_s)


def await_calls(
    refs: list, settings: Settings, dead_ends: bool = False
) -> tuple[list[tuple[str, object]], float, int | None]:
    """Each call's outcome: ("ok", result), ("broken", err) for a worker whose group broke,
    ("dead", err), ("silent", None) for one that did not answer in time, or ("failed", err)
    for an error of the worker's own, which ends the wait at once (the others: ("", None));
    when the first call that did not succeed was seen (0.0 if none); and the index of the
    failed call that came back last (the slowest member, when the group broke).

    The others answer within :func:`silence_s` of the first call that says its group broke
    (its collective failed), or they are silent. A dead worker's call does not start that
    clock: it says nothing of when the others come to the collective (still in their step,
    or held, they may come long after the death, and then fail at once).

    ``dead_ends``: a dead worker ends the wait at once too, for when the survivors' answers
    change nothing (every worker restarts) and they may be blocked on the dead one outside
    any collective (a Ray Dataset's split waits for all of its consumers)."""
    outcomes: list = [None] * len(refs)
    seen_at, broken_at, last = 0.0, 0.0, None
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    deadline = time.monotonic() + settings.call_timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        if not ready:
            left = max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                break
        for ref in ready:
            i = index[ref]
            outcomes[i] = call_outcome(ref)
            kind = outcomes[i][0]
            if kind == "ok":
                continue
            if kind == "failed" or (kind == "dead" and dead_ends):
                return [o or ("", None) for o in outcomes], time.monotonic(), i
            last = i
            seen_at = seen_at or time.monotonic()
            if kind == "broken":  # at the collective: the others answer within silence_s
                broken_at = broken_at or time.monotonic()
                deadline = min(deadline, broken_at + silence_s(settings))
    if None in outcomes:
        seen_at = seen_at or time.monotonic()
    return [o or ("silent", None) for o in outcomes], seen_at, last


def settle_outcomes(refs: list, settings: Settings) -> list[tuple[str, object]]:
    """The outcomes, as :func:`await_calls` gives them, of calls of survivors after their
    group broke: ("silent", None) for one still running :func:`silence_s` from now."""
    if not refs:
        return []
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=silence_s(settings))
    answered = set(done)
    return [call_outcome(ref) if ref in answered else ("silent", None) for ref in refs]


def call_outcome(ref: ray.ObjectRef) -> tuple[str, object]:
    """A finished call's outcome: ("ok", result), ("dead", err) for a call that says a
    process died (its own, or a peer's it needed: :data:`ACTOR_LOST`), ("broken", err) for a
    worker whose group broke, or ("failed", err) for an error of the worker's own, or an
    answer Ray cannot give back (lost with its node's object store, or not loadable here):
    that says nothing of the worker's death, and it fails the call in words instead of
    raising out of a recovery."""
    try:
        return ("ok", ray.get(ref))
    except ACTOR_LOST as err:
        return ("dead", err)
    except ray.exceptions.RayTaskError as err:
        if isinstance(getattr(err, "cause", None), GroupBrokenError):
            return ("broken", err)
        return ("failed", err)
    except ray.exceptions.RayError as err:
        return ("failed", err)


def classify_outcomes(
    outcomes: list[tuple[str, object]],
    ranks: list[int],
    settings: Settings,
    peers: dict[str, int],
    new: set[int],
) -> tuple[list, dict[int, str], str, tuple[int, Exception] | None]:
    """:func:`await_calls`' outcomes of the calls to ``ranks``, by kind: the results of those
    that succeeded, in order; the members lost (by rank: why); why the group broke, as the
    first member to say so said it ("" if none did); and the first error of a worker's own,
    as ``(rank, error)`` (None if none).

    A call that needed what another member was to make (restoring a survivor's snapshot)
    fails with that member's death when it dies first: that member, found by its actor's id
    in ``peers`` (rank by actor id), is lost. So is the caller, unless it is among the ``new``
    ranks (being set up: it is set up again from another member); one already in step may
    have taken part of that member's state."""
    results, lost, broken, failed = [], {}, "", None
    for rank, (kind, value) in zip(ranks, outcomes, strict=True):
        if kind == "ok":
            results.append(value)
        elif kind == "broken":  # why, not Ray's line naming the task
            broken = broken or first_line(getattr(value, "cause", None) or value)
        elif kind == "failed":
            failed = failed or (rank, value)
        elif kind:
            why = why_lost(kind, value, settings)
            peer = peers.get(getattr(value, "actor_id", None), rank)
            lost.setdefault(peer, why)
            if peer == rank or rank not in new:
                lost.setdefault(rank, why)
    return results, lost, broken, failed


def why_lost(kind: str, err, settings: Settings) -> str:
    if kind == "silent":
        return (
            f"silent: no answer within {silence_s(settings):g} s (twice "
            f"RAYMODULE_COLLECTIVE_TIMEOUT_S) after its peers' collective failed"
        )
    return f"{type(err).__name__}: {first_line(err)}"


def in_words(err: Exception, what: str) -> Exception:
    """The error to raise for a failed Ray call: raymodule's own error (e.g. a PlacementError,
    already in words) as it is, anything else as a WorkerError saying what failed."""
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, RayModuleError):
        return cause
    return WorkerError(f"{what}: {type(cause).__name__}: {cause}")
