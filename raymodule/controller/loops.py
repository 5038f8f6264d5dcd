"""The client's step loops under way on the controller, and what it keeps for each.

A step loop is fit's epoch, or a callback's ``score`` or ``predict`` inside it, each known by
the key the client gives it (None: a caller without loops, a test's, is one loop that never
ends). Loops interleave: a callback's loop reads past fit's steps in flight, so the
controller keeps, by loop, the metric its steps update on the workers, its steps finished and
their seconds until it reads them, a worker's error in its steps read by another loop's call,
and whether it is streaming a Ray Dataset's pass.
"""

from __future__ import annotations

__all__ = ["StepLoops"]

_KEPT = 64  # loops kept at most: each ends with end() (a loop whose client died never does)
_NONE = object()  # no loop's metric is known to be on every member


class StepLoops:
    """The client's step loops under way (see the module's docstring)."""

    def __init__(self):
        self.metric = None  # the metric on the workers, of the loop _metric_of
        self._metric_of: object = _NONE
        self._metrics: dict = {}
        self._finished: dict = {}
        self._errors: dict = {}
        self._passes: set = set()

    def start(self, loop, metric) -> None:
        """``loop``'s steps update ``metric`` on the workers (None: they return outputs); a
        loop given its metric again becomes the newest (its finished steps and error are
        kept). The metric is set on the workers again before the next steps."""
        self._metrics.pop(loop, None)
        self._metrics[loop] = metric
        while len(self._metrics) > _KEPT:
            self.end(next(iter(self._metrics)))
        self._metric_of = _NONE

    def end(self, loop) -> None:
        """Forgets ``loop``, which ended: its metric, its steps finished, its error and its
        pass."""
        self._metrics.pop(loop, None)
        self._finished.pop(loop, None)
        self._errors.pop(loop, None)
        self._passes.discard(loop)  # a pass cut short (num_batch, an error) is over

    def live(self, loop) -> bool:
        """Whether ``loop`` is under way."""
        return loop is None or loop in self._metrics

    def switch_metric(self, loop) -> bool:
        """Makes ``loop``'s metric :attr:`metric`; True when it was not the one on the
        workers, which must then be given it (a loop whose metric was let go keeps the one
        there)."""
        if loop in self._metrics and self._metric_of != loop:
            self.metric, self._metric_of = self._metrics[loop], loop
            return True
        return False

    def metric_unknown(self) -> None:
        """No loop's metric is known to be on every member: the next loop's is set again."""
        self._metric_of = _NONE

    def finished_of(self, loop) -> tuple[list, dict]:
        """Where the steps of ``loop`` finished go until it reads them (:meth:`reply`): a list
        of ``(serial, results, slices)`` and the seconds by slot; of a loop that ended,
        nowhere."""
        if not self.live(loop):
            return [], {}
        return self._finished.setdefault(loop, ([], {}))

    def keep(self, loop, err: Exception) -> None:
        """Keeps an error in the steps of ``loop`` for its next reply; one of a loop that
        ended is dropped with it."""
        if self.live(loop):
            self._errors.setdefault(loop, err)

    def reply(self, loop, reply: dict) -> dict:
        """``reply`` with the steps of ``loop`` finished since its last reply, and their
        seconds by slot; or the error a worker raised in one of them, read by another call."""
        done, seconds = self._finished.pop(loop, ([], {}))
        if loop in self._errors:
            raise self._errors.pop(loop)
        return dict(reply, steps=done, seconds=seconds)

    def streaming(self, loop) -> None:
        """``loop`` sends the steps of a Ray Dataset's pass (not a loop that ended: a
        resend's)."""
        if self.live(loop):
            self._passes.add(loop)

    def pass_over(self, loop) -> None:
        """``loop``'s pass is over: its last step is done, or it sends other steps."""
        self._passes.discard(loop)

    @property
    def in_pass(self) -> bool:
        """A Ray Dataset's pass is being streamed, by some loop: its splits are fixed (a loss
        restarts the run, ``Loss.mid_pass``), whatever other loops (a callback's ``score``)
        send meanwhile."""
        return bool(self._passes)
