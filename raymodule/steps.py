"""The step stream of ``fit``, ``score``, ``predict`` and ``iter_predict``: batches sent ahead
to the workers in chunks, their results read back in order.

The client reads the ``DataIter`` and sends the workers chunks of consecutive global batches,
as many as take them about ``RAYMODULE_CALL_S`` (:func:`steps_per_call`), one object-store
transfer and one controller call per chunk; up to ``RAYMODULE_PIPELINE_DEPTH`` chunks are in
flight (the bounded queue), so workers do not wait for the client. A
:class:`raymodule.data.DatasetIter` or :class:`raymodule.data.RayDataIter` sends no samples:
the workers read their own rows. Results come back in order (:func:`steps`);
:func:`run_steps` merges metric increments into the user's metric and runs the callbacks,
trailing the workers by at most the batches in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from dataclasses import dataclass

import ray
from mxnet.base import _as_list
from mxnet.model import BatchEndParam

from . import data, metrics
from .errors import Preempted, ResumeMismatch
from .sealed import seal

__all__ = ["Epoch", "run_steps", "steps"]

# the most steps of a dataset in one plan: the controller runs a plan at the workers' pace,
# its replies wait in the object store until read, and callbacks trail by up to a plan
_PLAN_STEPS = 256


@dataclass
class Epoch:
    """What :func:`run_steps` did: the metric after the last batch, the batches of the epoch
    done (skipped ones included), the samples it ran and the seconds each worker slot spent
    in its steps."""

    name_values: list
    batches: int
    samples: int
    step_seconds: dict


@dataclass
class _Step:
    nbatch: int
    data_batch: object
    batch: object  # the global batch as numpy (data.Batch); None for a dataset's batch
    target: object  # the raymodule Module that runs it
    index: object = None  # a dataset's batch: its dataset indices (the workers read the rows)

    def labels(self, part: slice, dataset) -> list:
        """The labels of rows ``part`` of the batch (for a metric updated in the client)."""
        if self.batch is not None:
            return self.batch.worker_slice(part)[1]
        return dataset.batch(self.index[part]).label


def _batches(data_iter, indexed: bool, passes: int | None = None):
    """The batches of ``data_iter``; of a dataset the workers read (``indexed``): their
    indices only, as :func:`raymodule.data.index_batch` describes them; of a Ray Dataset the
    workers stream (``passes``: its global batches in this pass): a description of each."""
    if passes is not None:
        for _ in range(passes):
            yield data.index_batch(None, 0, data_iter)
        return
    if not indexed:
        yield from data_iter
        return
    while True:
        try:
            index, pad = data_iter.next_indices()
        except StopIteration:
            return
        yield data_iter.batch_of(index, pad)


def _from_first(batches, epoch: int, num_batch: int | None, first_batch: int):
    """``(nbatch, batch)`` of ``batches`` from batch ``first_batch`` on, the ones before it
    read and skipped (they were trained before the run resumed), up to ``num_batch``. Batches
    that end before batch ``first_batch`` are not the data the run was trained on:
    :class:`raymodule.ResumeMismatch`."""
    given = 0
    for nbatch, batch in enumerate(batches):
        if num_batch is not None and nbatch == num_batch:
            break
        given = nbatch + 1
        if nbatch >= first_batch:
            yield nbatch, batch
    if given <= first_batch and first_batch > 0:
        raise ResumeMismatch(
            f"the run resumes epoch {epoch} after batch {first_batch}, but train_data gives "
            f"only {given} batches in it: it is not the data the run was trained on. Resume "
            "with that data, or start a new run: another RunConfig(name=...)"
        )


def run_steps(
    module,
    data_iter,
    method,
    metric,
    epoch,
    batch_end_callback,
    *,
    score_end_callback=None,
    **how,
):
    """Runs ``method`` ("train_step" or "eval_step") on every batch of ``data_iter``, merging
    each step's metric updates into ``metric`` and calling ``batch_end_callback`` after it,
    then ``score_end_callback``; ``how``: :func:`steps`'s keywords. Returns an
    :class:`Epoch`."""
    tic = time.time()  # MXNet's fit loop has the epoch's start in its locals as `tic`
    tally = Epoch([], 0, 0, {})
    on_workers = metrics.runs_on_workers(metric)
    monitor = how.get("monitor")
    done = 0
    stream = steps(module, data_iter, method, metric, epoch, tally, **how)
    with contextlib.closing(stream):
        for step, results, slices in stream:
            if results is not None and on_workers:
                for increments in results:
                    metrics.add_counters(metric, increments)
            elif results is not None:
                dataset = data_iter.dataset if step.index is not None else None
                labels = [step.labels(part, dataset) for part in slices]
                metrics.update_per_slice(
                    metric, step.target.label_names, step.target.output_names, labels, results
                )
            if monitor is not None:
                monitor.toc_print()
            _call_back(
                batch_end_callback,
                module,
                data_iter,
                step.data_batch,
                epoch,
                step.nbatch,
                metric,
                tic,
            )
            done += 1
    tally.name_values = metric.get_global_name_value()
    _call_back(score_end_callback, module, data_iter, None, epoch, done, metric, tic)
    return tally


def steps(module, data_iter, method, metric, epoch, tally: Epoch, **how):
    """:func:`_steps`, as a loop of its own on the controller (an id that its calls carry),
    which it ends however it ends."""
    loop = uuid.uuid4().hex
    try:
        yield from _steps(module, data_iter, method, metric, epoch, tally, loop, **how)
    finally:
        module._workers.end_loop(loop)


def _steps(
    module,
    data_iter,
    method,
    metric,
    epoch,
    tally: Epoch,
    loop: str,
    *,
    monitor=None,
    num_batch=None,
    sparse_row_id_fn=None,
    first_batch=0,
    checkpoint_every=0,
    on_checkpoint=None,
    stop=None,
    params_at_end=False,
):
    """Runs ``method`` ("train_step" or "eval_step") on every batch of ``data_iter`` and
    yields each step once it finished, in order: ``(step, results, slices)``, where
    ``results`` are the members' (metric increments when ``metric`` runs on the workers,
    else their outputs; None for a step the survivors of a loss had applied already) and
    ``slices`` the rows each ran. ``tally`` (an :class:`Epoch`) counts the batches, samples
    and step seconds.

    ``module._step_module(data_batch, flush)`` gives the :class:`raymodule.Module` that runs a
    batch (a bucketing module's bucket, reshaped to the batch when needed); it calls
    ``flush()`` before it changes how batches already queued would be split.

    The first ``first_batch`` batches are read and skipped (they were trained before a run
    resumed); a ``data_iter`` that ends before it gives batch ``first_batch`` is not the data
    the run was trained on, and raises :class:`raymodule.ResumeMismatch`. Every
    ``checkpoint_every`` batches, ``on_checkpoint(nbatch, steps)`` is called once the steps
    before batch ``nbatch`` are sent and before any later one is, so a worker call it makes
    sees the state after exactly ``nbatch`` batches (``steps`` training steps applied); it is
    called only when another batch follows (the epoch's end has its own).
    When ``stop()`` becomes true (the process received SIGTERM), the loop checkpoints at the
    next batch boundary the same way, finishes the steps sent and raises
    :class:`raymodule.errors.Preempted`; when a worker received it, the loop checkpoints at
    the next batch boundary too, and the controller removes that worker there, gracefully; a
    worker whose node is drained is removed within a call, and the loop checkpoints at the
    batch boundary after it.
    With ``params_at_end`` (the caller reads the parameters next, as fit does for an
    ``epoch_end_callback``), worker 0's parameters after the last step come with the last
    step's progress when the controller runs the steps (:meth:`ControllerHandle.params`).

    The controller runs the steps (:meth:`raymodule.controller.Controller.advance`): this
    loop puts each worker's part of every chunk of batches in the object store, hands the
    controller the references and reads back the steps finished, in order. A
    :class:`raymodule.data.DatasetIter` (for a module with ``_reads_datasets``) is not read
    here: its dataset is put in the object store once and each step carries its batch's
    indices only; the workers read their rows. In an elastic
    run, steps that a lost worker voided are run again on the re-formed group; steps the
    survivors had applied are not: their metric updates are missing, and they are yielded
    with None as results. Each loop has an id of its own, ``loop``: a loop a callback runs
    inside this one (``score``, ``predict``) is given its own steps only, and the workers'
    metric is set back to this loop's before its next steps.
    """
    workers = module._workers
    # a DatasetIter: the workers read their rows; the client sends indices only
    indexed = isinstance(data_iter, data.DatasetIter) and getattr(module, "_reads_datasets", False)
    planned = indexed and monitor is None  # the controller runs them, from a plan
    if not planned:  # a plan waits for the calls posted before it on the controller
        workers.sync()
    workers.set_metric(metric, loop)
    dataset = data_iter.dataset if indexed else None
    if indexed:
        # an ArrayDataset is put in the object store once here; the calls carry its reference
        dataset.key()
        dataset = seal(dataset)  # the controller only relays it
    # a RayDataIter: each worker streams its own share of every batch from its split
    stream, passes = None, None
    if isinstance(data_iter, data.RayDataIter):
        if not getattr(module, "_reads_datasets", False):
            raise ValueError(
                f"{type(module).__name__} cannot stream a raymodule.data.RayDataIter; "
                "use raymodule.Module"
            )
        if metric is not None and not metrics.runs_on_workers(metric):
            raise ValueError(
                f"the metric {metric.name!r} needs every label in the client, which a "
                "RayDataIter never reads there; use metrics computed on the workers "
                "(accuracy, cross-entropy, ...)"
            )
        # the module reshaped to the iterator's batches (nothing is queued yet), then split
        module._step_module(data.index_batch(None, 0, data_iter), flush=lambda: None)
        shares = [cut.stop - cut.start for cut in module._slices]
        passes = data_iter.batches_per_pass(shares)
        stream = {
            "dataset": data_iter.dataset,
            "key": data_iter.key,
            "pass": data_iter.epoch,
            "batches": passes,
            "data_names": data_iter.data_names,
            "label_names": data_iter.label_names,
        }
    if planned:
        yield from _planned(
            module, data_iter, method, epoch, tally, dataset, loop, num_batch=num_batch,
            sparse_row_id_fn=sparse_row_id_fn, first_batch=first_batch,
            checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint, stop=stop,
            params_at_end=params_at_end,
        )  # fmt: skip
        return
    # with a monitor, statistics are collected step by step, as MXNet does: one a call
    depth = 0 if monitor is not None else workers.settings.pipeline_depth
    sent: dict[int, _Step] = {}  # by serial, until finished
    chunk: list[_Step] = []
    finished: list = []  # (step, results, slices) read back, not yielded yet
    serials = itertools.count()
    checkpoint_due = False  # a member is leaving or left: checkpoint at the next boundary
    departures = workers.departures  # members that left: a drained node's go within one call

    def advance(keep: int) -> None:
        """Sends the chunk (if any), then reads finished steps until ``keep`` chunks are in
        flight."""
        spec = None
        if chunk:
            if monitor is not None:
                monitor.tic()
            ids = [next(serials) for _ in chunk]
            sent.update(zip(ids, chunk))
            slices = [step.target._slices for step in chunk]
            spec = {
                "serials": ids,
                "mids": [step.target._id for step in chunk],
                "sizes": [cut[-1].stop for cut in slices],
                "slices": [[(c.start, c.stop) for c in cut] for cut in slices],
            }
            if indexed or stream is not None:  # the workers read the rows: with labels?
                spec["labels"] = [bool(step.target._label_shapes) for step in chunk]
            if indexed:
                spec["dataset"] = dataset
                spec["indices"] = [step.index for step in chunk]
            elif stream is not None:
                spec["stream"] = dict(stream, positions=[step.nbatch for step in chunk])
                stream.pop("dataset", None)  # the controller keeps it after the first chunk
            else:
                parts = zip(*(step.batch.parts(cut) for step, cut in zip(chunk, slices)))
                spec["sources"] = [ray.put(list(part)) for part in parts]
            chunk.clear()
        reply = workers.advance(method, spec, keep, loop)
        nonlocal checkpoint_due, departures
        left = workers.departures > departures
        departures = workers.departures
        checkpoint_due = checkpoint_due or bool(workers.leaving) or left
        _add_seconds(tally, reply)
        for serial, results, slices in reply["steps"]:
            finished.append((sent.pop(serial), results, slices))

    def ready():
        yield from finished
        finished.clear()

    batches = _from_first(_batches(data_iter, indexed, passes), epoch, num_batch, first_batch)
    try:
        tally.batches = first_batch
        for nbatch, data_batch in batches:
            if stop is not None and stop():
                advance(keep=0)  # first: a loss meanwhile would void the checkpoint's copy
                yield from ready()
                raise _preempt(epoch, nbatch, first_batch, on_checkpoint, workers.steps_sent)
            every = checkpoint_every and nbatch % checkpoint_every == 0
            if (every or checkpoint_due) and on_checkpoint is not None and nbatch > first_batch:
                advance(keep=depth)
                yield from ready()
                on_checkpoint(nbatch, workers.steps_sent)
                checkpoint_due = False
            tally.batches = nbatch + 1
            target = module._step_module(data_batch, flush=lambda: advance(keep=depth))
            target.prepare(data_batch, sparse_row_id_fn=sparse_row_id_fn)
            if indexed:
                tally.samples += len(data_batch.index)
                chunk.append(_Step(nbatch, data_batch, None, target, data_batch.index))
            elif stream is not None:
                tally.samples += data_iter.batch_size
                chunk.append(_Step(nbatch, data_batch, None, target))
            else:
                batch = target._batch(data_batch)
                tally.samples += batch.data[0].shape[batch.data_axes[0]] if batch.data else 0
                chunk.append(_Step(nbatch, data_batch, batch, target))
            if len(chunk) >= (1 if monitor is not None else workers.steps_per_call):
                advance(keep=depth)
            yield from ready()
        advance(keep=0)
        yield from ready()
    except BaseException:
        # the caller stopped early (it broke out of iter_predict, or its callback raised), a
        # batch, a checkpoint or a step failed, or the process was interrupted: the steps in
        # flight finish unread, so that the next loop starts on an empty pipeline (unless the
        # controller is lost: nothing is waited for again)
        if sent and workers.live:
            with contextlib.suppress(Exception):  # the error raised is the one that stopped it
                workers.advance(method, None, 0, loop)
        raise


def _planned(
    module, data_iter, method, epoch, tally: Epoch, dataset, loop, *, num_batch, sparse_row_id_fn,
    first_batch, checkpoint_every, on_checkpoint, stop, params_at_end,
):  # fmt: skip
    """:func:`steps` of a :class:`raymodule.data.DatasetIter`: the controller runs them. The
    batches' indices are read here into plans of up to ``_PLAN_STEPS`` steps, one controller
    call each (:meth:`raymodule.controller.Controller.run`), whose progress is read as the
    controller sends the chunks, places the checkpoints (every ``checkpoint_every`` batches,
    and where a member leaves) and finishes the steps. A checkpoint the controller took is
    handed to ``on_checkpoint(nbatch, steps, snapshot)`` as it is read. When ``stop()``
    becomes true the plan is stopped at the controller's next chunk boundary, checkpointed
    there and :class:`raymodule.errors.Preempted` raised; when the caller stops reading (or
    a checkpoint is refused here, or the process is interrupted), it is stopped and the steps
    the controller sent finish unread. With ``params_at_end``, the last plan asks for worker
    0's parameters after its steps (:meth:`ControllerHandle.params` reads them).
    The first plan waits for the calls posted before it (and raises the first error among
    them, after its batches were read); with no plan at all, the client asks for that wait."""
    workers = module._workers
    serials = itertools.count()
    plan: list[_Step] = []
    early: list = []  # (step, results, slices) of a plan run before a reshape, not yielded yet
    plans = 0

    def run_plan(last: bool = False):
        """Runs the plan; yields its steps as they finish. The ``last`` of an epoch brings
        the parameters after it when the caller asked for them."""
        nonlocal plans
        if not plan:
            return
        plans += 1
        sent = {next(serials): step for step in plan}
        spec = {
            "serials": list(sent),
            "mids": [step.target._id for step in plan],
            "sizes": [step.target._slices[-1].stop for step in plan],
            "labels": [bool(step.target._label_shapes) for step in plan],
            "dataset": dataset,
            "indices": [step.index for step in plan],
            "positions": [step.nbatch for step in plan],
            "depth": workers.settings.pipeline_depth,
            "loop": loop,
        }
        if last and params_at_end:
            spec["params_at_end"] = module._snapshot_id
        if on_checkpoint is not None:
            spec.update(
                snapshot=module._snapshot_id,
                checkpoint_every=checkpoint_every or 0,
                first_batch=first_batch,
            )
        plan.clear()
        progress = workers.run(method, spec, training=stop is not None)
        try:
            for reply in progress:
                if reply.get("checkpoint") is not None:
                    on_checkpoint(*reply["checkpoint"])
                _add_seconds(tally, reply)
                for serial, results, slices in reply["steps"]:
                    yield sent.pop(serial), results, slices
                stopped_at = reply.get("stopped_at")
                if stopped_at is not None:  # stopped below: the steps before it are done
                    steps = workers.steps_sent
                    raise _preempt(epoch, stopped_at, first_batch, on_checkpoint, steps)
        except BaseException:
            # the caller stopped reading (see steps), a checkpoint could not be handed to the
            # writer, or the process was interrupted: unless the plan ended (or the controller
            # is lost: nothing is waited for again), it is stopped at the controller's next
            # chunk boundary and the steps it sent finish unread
            if not progress.ended and workers.live:
                with contextlib.suppress(Exception):  # the error raised is the one that stopped it
                    progress.stop()
                    for _ in progress:
                        pass
            raise

    def run_early():
        early.extend(run_plan())

    tally.batches = first_batch
    for nbatch, data_batch in _from_first(_batches(data_iter, True), epoch, num_batch, first_batch):
        if stop is not None and stop():
            yield from run_plan()
            raise _preempt(epoch, nbatch, first_batch, on_checkpoint, workers.steps_sent)
        if len(plan) >= _PLAN_STEPS:  # run once another batch follows: the last is never empty
            yield from run_plan()
        tally.batches = nbatch + 1
        target = module._step_module(data_batch, flush=run_early)
        target.prepare(data_batch, sparse_row_id_fn=sparse_row_id_fn)
        tally.samples += len(data_batch.index)
        plan.append(_Step(nbatch, data_batch, None, target, data_batch.index))
        yield from early
        early.clear()
    yield from run_plan(last=True)
    if not plans:  # no batch: the calls posted before are checked all the same
        workers.sync()


def _add_seconds(tally: Epoch, reply: dict) -> None:
    for slot, took in reply["seconds"].items():
        tally.step_seconds[slot] = tally.step_seconds.get(slot, 0.0) + took


def _preempt(epoch: int, nbatch: int, first_batch: int, on_checkpoint, steps: int) -> Preempted:
    """Checkpoints the run stopped before batch ``nbatch`` (``steps`` training steps applied)
    and says so. At its first batch the run has a checkpoint there already: the one it
    resumed from, or the epoch's end."""
    if nbatch > first_batch:
        on_checkpoint(nbatch, steps)
    return Preempted(
        f"fit stopped at epoch {epoch}, batch {nbatch}: the process received SIGTERM; "
        "run it again with the same RunConfig.name to go on from there"
    )


def _call_back(callbacks, module, data_iter, data_batch, epoch, nbatch, metric, tic) -> None:
    """Calls MXNet-style callbacks with a ``BatchEndParam`` whose ``locals`` hold what MXNet's
    loops expose: ``self``, ``data_batch``, the iterator, epoch, batch number, metric and
    ``tic``, the loop's start (``time.time()``). Callbacks trail the workers in bursts of a
    call's steps, so a rate is true over the time since ``tic``, not between two callbacks."""
    if not callbacks:
        return
    scope = {
        "self": module,
        "data_batch": data_batch,
        "data_iter": data_iter,
        "epoch": epoch,
        "nbatch": nbatch,
        "eval_metric": metric,
        "tic": tic,
    }
    params = BatchEndParam(epoch=epoch, nbatch=nbatch, eval_metric=metric, locals=scope)
    for callback in _as_list(callbacks):
        callback(params)
