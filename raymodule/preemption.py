"""SIGTERM while a run trains: the notice that a preemption, ``ray job stop`` or Ray's graceful
node shutdown gives before it kills the process.

While a run's ``fit`` is going on in the main thread, a SIGTERM is noted instead of ending the
process at once; the step loop then stops at the next batch boundary with a checkpoint, the run
waits for it to commit, and the signal is delivered again to whatever handled it before (by
default the process ends, as it would have). A run started again with the same name then loses
no step. Outside the main thread (a Tune trial's) signals cannot be caught: nothing changes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

__all__ = ["SigtermNotice"]

log = logging.getLogger(__name__)


class SigtermNotice:
    """Notes SIGTERM between :meth:`install` and :meth:`restore` (``received``)."""

    def __init__(self):
        self.received = False
        self._previous = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.signal(signal.SIGTERM, self._note)
        # None: a handler not set from Python; the default is what it did
        self._previous = signal.SIG_DFL if previous is None else previous
        self._installed = True

    def _note(self, signum, frame) -> None:
        if not self.received:
            log.warning("raymodule: SIGTERM: checkpointing at the next batch, then stopping")
        self.received = True

    def restore(self) -> None:
        """Puts the previous handler back and, if SIGTERM came, delivers it to that handler."""
        if not self._installed:
            return
        signal.signal(signal.SIGTERM, self._previous)
        self._installed = False
        if self.received:
            os.kill(os.getpid(), signal.SIGTERM)
