"""The client's handle on a module family's controller and workers.

Every call to the workers goes through here: it submits one Ray call per worker, keeps the
calls whose results nobody asked for yet (MXNet's engine is asynchronous too: an error
surfaces at the next call that reads a result), and turns Ray's errors into raymodule's.
"""

from __future__ import annotations

import gc
import logging
import weakref

import mxnet as mx
import ray

from . import runtime
from .constants import Settings
from .context import local_device, resources_of
from .controller import RemoteController
from .errors import RayModuleError, WorkerError, WorkerLostError

__all__ = ["WorkerSet"]

log = logging.getLogger(__name__)

_MAX_UNCHECKED = 64


def _shutdown(controller) -> None:
    """Stops a family's workers and controller; safe at interpreter exit."""
    if not ray.is_initialized():
        return
    try:
        ray.get(controller.shutdown.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the controller may be gone already
        pass
    try:
        ray.kill(controller, no_restart=True)
    except Exception:  # noqa: BLE001
        pass


class WorkerSet:
    """One worker actor per context, started by a controller actor; released when closed or
    when no module uses them any more."""

    def __init__(self, contexts: list[mx.Context]):
        runtime.ensure_ray()
        gc.collect()  # modules that were dropped release their workers before we ask for more
        self.contexts = contexts
        self.settings = Settings.from_env()
        backend = "nccl" if any(c.device_type == "gpu" for c in contexts) else "gloo"
        self.controller = RemoteController.remote(
            [resources_of(c) for c in contexts],
            [local_device(c) for c in contexts],
            runtime.started_locally(),
            backend,
            self.settings,
        )
        self.handles: list = []
        self._finalizer = weakref.finalize(self, _shutdown, self.controller)
        self._unchecked: list[tuple[int, ray.ObjectRef, str]] = []
        self.lost: WorkerLostError | None = None
        self.params_dirty = False  # the workers' parameters are newer than the client's copy
        try:
            self.handles = ray.get(self.controller.start.remote())
        except ray.exceptions.RayError as err:
            self.close()
            raise _in_words(
                err, f"starting {len(contexts)} workers for {contexts} failed"
            ) from None

    def close(self) -> None:
        self._finalizer()
        self.handles = []

    @property
    def world_size(self) -> int:
        return len(self.handles)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # -- calls -------------------------------------------------------------------------------
    def submit(self, method: str, *args, per_worker=None, ranks=None) -> list[ray.ObjectRef]:
        """Calls ``method(*args, *per_worker[rank])`` on every worker (or ``ranks``), no wait."""
        if self.lost is not None:
            raise self.lost
        if self.closed:
            raise WorkerLostError("this module was closed; its workers are gone")
        refs = []
        for rank in range(len(self.handles)) if ranks is None else ranks:
            extra = per_worker[rank] if per_worker is not None else ()
            refs.append(getattr(self.handles[rank], method).remote(*args, *extra))
        return refs

    def post(self, method: str, *args, per_worker=None) -> None:
        """Like :meth:`submit`, for calls whose result is only checked at the next sync."""
        for rank, ref in enumerate(self.submit(method, *args, per_worker=per_worker)):
            self._unchecked.append((rank, ref, method))
        if len(self._unchecked) > _MAX_UNCHECKED:
            self.sync()

    def call(self, method: str, *args, per_worker=None, ranks=None) -> list:
        """Calls ``method`` on the workers and returns their results, in rank order."""
        refs = self.submit(method, *args, per_worker=per_worker, ranks=ranks)
        return self.get(refs, method, ranks)

    def sync(self) -> None:
        """Waits for every posted call and raises the first error among them."""
        unchecked, self._unchecked = self._unchecked, []
        for rank, ref, method in unchecked:
            self.get([ref], method, [rank])

    def get(self, refs: list, method: str, ranks=None) -> list:
        """``ray.get`` that names the worker and says a lost worker is lost.

        When a worker dies inside a collective, its peers' calls fail too; every result is
        awaited so that the lost worker is reported rather than a peer's broken connection.
        """
        ranks = list(range(len(refs))) if ranks is None else ranks
        results, lost, failed = [], [], None
        for rank, ref in zip(ranks, refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayActorError as err:
                lost.append((rank, err))
            except ray.exceptions.RayTaskError as err:
                failed = failed or (rank, err)
        if lost:
            rank, err = lost[0]
            where = self.contexts[rank]
            self.lost = WorkerLostError(
                f"worker {rank} ({where}) was lost during {method}(): "
                f"{type(err).__name__}: {_first_line(err)}; {len(lost)} of {len(refs)} workers "
                "lost. The module cannot continue; create a new one"
            )
            raise self.lost
        if failed:
            rank, err = failed
            raise _in_words(err, f"worker {rank} failed in {method}()") from None
        return results


def _in_words(err: Exception, what: str) -> Exception:
    """The error to raise for a failed Ray call: raymodule's own error (e.g. a PlacementError,
    already in words) as it is, anything else as a WorkerError saying what failed."""
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, RayModuleError):
        return cause
    return WorkerError(f"{what}: {type(cause).__name__}: {cause}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
