"""raymodule's exceptions: one tree, all picklable so they cross actor boundaries intact."""

from __future__ import annotations

__all__ = [
    "RayModuleError",
    "CallOrderError",
    "PlacementError",
    "WorkerError",
    "WorkerLostError",
    "CheckpointError",
    "ResumeMismatch",
    "GroupBrokenError",
    "Preempted",
    "first_line",
]


def first_line(err: BaseException) -> str:
    """An error's first line (its type's name if it has no message): what a one-line report
    of it shows."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class RayModuleError(RuntimeError):
    """Base class of the errors raymodule raises itself (user mistakes raise ValueError)."""


class CallOrderError(RayModuleError, AssertionError):
    """A module method was called before what it needs (``bind``, ``init_params``, ...).

    It is also an ``AssertionError``, which is what MXNet's ``Module`` raises in that case.
    """


class PlacementError(RayModuleError):
    """The workers a module asked for cannot be placed on the cluster."""


class WorkerError(RayModuleError):
    """A worker raised while running a module call; the message carries the worker's error."""


class WorkerLostError(RayModuleError):
    """A worker process died or stopped answering; the module cannot go on without it."""


class CheckpointError(RayModuleError):
    """A run's checkpoints cannot be written or resumed from as asked."""

    committed: str | None = None
    """Raised by a write's owner check after its commit (as it tidied): the checkpoint it
    committed, by folder name; else None."""


class ResumeMismatch(CheckpointError, ValueError):
    """The ``fit`` that would resume a run differs from the run its checkpoint was taken in
    (symbol, optimizer, batch size, data); nothing is trained or written.

    It is also a ``ValueError``: the resuming call's arguments are what is wrong."""


class GroupBrokenError(RayModuleError):
    """A worker's collective group broke (a peer was lost or went silent); the step it was in
    is not applied, and the worker takes no step until the group is formed again."""


class Preempted(RayModuleError):
    """``fit`` stopped at a batch boundary because its process received SIGTERM (a preemption,
    ``ray job stop``); its run committed a checkpoint there first, so running it again with the
    same name goes on from that batch."""
