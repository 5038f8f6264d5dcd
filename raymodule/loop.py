"""``fit`` and ``score`` for raymodule's modules, and their step loop: batches streamed ahead
to the workers.

The client reads the ``DataIter`` and sends the workers chunks of ``RAYMODULE_STEPS_PER_CALL``
consecutive global batches, one object-store transfer and one call per chunk; up to
``RAYMODULE_PIPELINE_DEPTH`` chunks are in flight (the bounded queue), so workers do not wait
for the client. Results come back in order: metric increments are merged into the user's
metric and the callbacks run, trailing the workers by at most the batches in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass

import mxnet as mx
import ray
from mxnet.base import _as_list
from mxnet.initializer import Uniform
from mxnet.model import BatchEndParam

from . import data, metrics, runtime
from .checkpoint import continuity
from .constants import Settings
from .controller import EveryWorkerLost, policy
from .errors import CallOrderError, Preempted, RayModuleError, ResumeMismatch, WorkerLostError
from .kvstore import check_kvstore
from .run import Run, RunConfig

__all__ = ["TrainingLoops", "run_steps", "steps", "Epoch"]


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
        yield data.index_batch(index, pad, data_iter)


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
                batch_end_callback, module, data_iter, step.data_batch, epoch, step.nbatch, metric
            )
            done += 1
    tally.name_values = metric.get_global_name_value()
    _call_back(score_end_callback, module, data_iter, None, epoch, done, metric)
    return tally


def steps(
    module,
    data_iter,
    method,
    metric,
    epoch,
    tally: Epoch,
    *,
    monitor=None,
    num_batch=None,
    sparse_row_id_fn=None,
    first_batch=0,
    checkpoint_every=0,
    on_checkpoint=None,
    stop=None,
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
    the next batch boundary too, and the controller removes that worker there, gracefully.

    The controller runs the steps (:meth:`raymodule.controller.Controller.advance`): this
    loop puts each worker's part of every chunk of batches in the object store, hands the
    controller the references and reads back the steps finished, in order. A
    :class:`raymodule.data.DatasetIter` (for a module with ``_reads_datasets``) is not read
    here: its dataset is put in the object store once and each step carries its batch's
    indices only; the workers read their rows. In an elastic
    run, steps that a lost worker voided are run again on the re-formed group; steps the
    survivors had applied are not: their metric updates are missing, and they are yielded
    with None as results.
    """
    workers = module._workers
    workers.sync()
    workers.set_metric(metric)
    # a DatasetIter: the workers read their rows; the client sends indices only
    indexed = isinstance(data_iter, data.DatasetIter) and getattr(module, "_reads_datasets", False)
    dataset = data_iter.dataset if indexed else None
    if indexed:
        # an ArrayDataset is put in the object store once here; the calls carry its reference
        dataset.key()
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
    if monitor is not None:  # statistics are collected step by step, as MXNet does
        per_call, depth = 1, 0
    else:
        per_call = workers.settings.steps_per_call
        depth = workers.settings.pipeline_depth
    sent: dict[int, _Step] = {}  # by serial, until finished
    chunk: list[_Step] = []
    finished: list = []  # (step, results, slices) read back, not yielded yet
    serials = itertools.count()
    checkpoint_due = False  # a worker was shut down: checkpoint at the next batch boundary

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
            if indexed:
                spec["dataset"] = dataset
                spec["indices"] = [step.index for step in chunk]
                spec["labels"] = [bool(step.target._label_shapes) for step in chunk]
            elif stream is not None:
                spec["stream"] = dict(stream, positions=[step.nbatch for step in chunk])
                stream.pop("dataset", None)  # the controller keeps it after the first chunk
                spec["labels"] = [bool(step.target._label_shapes) for step in chunk]
            else:
                parts = zip(*(step.batch.parts(cut) for step, cut in zip(chunk, slices)))
                spec["sources"] = [ray.put(list(part)) for part in parts]
            chunk.clear()
        reply = workers.advance(method, spec, keep)
        nonlocal checkpoint_due
        checkpoint_due = checkpoint_due or bool(workers.leaving)
        for slot, took in reply["seconds"].items():
            tally.step_seconds[slot] = tally.step_seconds.get(slot, 0.0) + took
        for serial, results, slices in reply["steps"]:
            finished.append((sent.pop(serial), results, slices))

    def ready():
        yield from finished
        finished.clear()

    try:
        tally.batches, given = first_batch, 0
        for nbatch, data_batch in enumerate(_batches(data_iter, indexed, passes)):
            if num_batch is not None and nbatch == num_batch:
                break
            given = nbatch + 1
            if nbatch < first_batch:
                continue
            if stop is not None and stop():
                advance(keep=0)  # first: a loss meanwhile would void the checkpoint's copy
                yield from ready()
                if nbatch > first_batch:  # else the checkpoint it resumed from, or the epoch's end
                    on_checkpoint(nbatch, workers.steps_sent)
                raise Preempted(
                    f"fit stopped at epoch {epoch}, batch {nbatch}: the process received SIGTERM; "
                    "run it again with the same RunConfig.name to go on from there"
                )
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
            if len(chunk) >= per_call:
                advance(keep=depth)
            yield from ready()
        if given <= first_batch and first_batch > 0:  # nothing was sent: nothing trained or written
            raise ResumeMismatch(
                f"the run resumes epoch {epoch} after batch {first_batch}, but train_data gives "
                f"only {given} batches in it: it is not the data the run was trained on. Resume "
                "with that data, or start a new run: another RunConfig(name=...)"
            )
        advance(keep=0)
        yield from ready()
    except GeneratorExit:
        # the caller stopped early (it broke out of iter_predict, or its callback raised):
        # the steps in flight finish unread, so that the next loop starts on an empty pipeline
        if sent:
            with contextlib.suppress(RayModuleError):  # a loss shows at the next call
                workers.advance(method, None, 0)
        raise


def _call_back(callbacks, module, data_iter, data_batch, epoch, nbatch, metric) -> None:
    """Calls MXNet-style callbacks with a ``BatchEndParam`` whose ``locals`` hold what MXNet's
    loops expose: ``self``, ``data_batch``, the iterator, epoch, batch number and metric."""
    if not callbacks:
        return
    scope = {
        "self": module,
        "data_batch": data_batch,
        "data_iter": data_iter,
        "epoch": epoch,
        "nbatch": nbatch,
        "eval_metric": metric,
    }
    params = BatchEndParam(epoch=epoch, nbatch=nbatch, eval_metric=metric, locals=scope)
    for callback in _as_list(callbacks):
        callback(params)


class TrainingLoops:
    """``fit`` and ``score`` of raymodule's modules: MXNet's, with the steps on the workers.

    A module using them provides, besides MXNet's intermediate API: ``_workers``,
    ``_context``, ``_work_load_list``, ``_step_module(data_batch, flush)`` (see
    :func:`run_steps`), ``_snapshot_id`` (the module whose replicas hold every parameter and the
    optimizer), ``_checkpoint_files()`` (the files that describe the model in a run
    checkpoint, by name) and ``_param_shapes()`` (the bound parameters' shapes, by name).
    """

    def fit(
        self,
        train_data,
        eval_data=None,
        eval_metric="acc",
        epoch_end_callback=None,
        batch_end_callback=None,
        kvstore="local",
        optimizer="sgd",
        optimizer_params=(("learning_rate", 0.01),),
        eval_end_callback=None,
        eval_batch_end_callback=None,
        initializer=Uniform(0.01),
        arg_params=None,
        aux_params=None,
        allow_missing=False,
        force_rebind=False,
        force_init=False,
        begin_epoch=0,
        num_epoch=None,
        validation_metric=None,
        monitor=None,
        sparse_row_id_fn=None,
        run=None,
    ):
        """MXNet's ``fit``; the steps run on the workers, streamed ahead of the callbacks.

        With ``run`` (a :class:`raymodule.RunConfig`), the run is checkpointed to its folder in
        storage every ``run.checkpoint_every`` batches and at each epoch's end, in the
        background, and a run of the same name resumes from its latest verified checkpoint:
        parameters, optimizer state, the update count (which places the learning-rate schedule)
        and position in the data. For the same data order, pass ``train_data`` as a fresh
        iterator (as a new process makes it): it is reset once per completed epoch and the
        batches already trained are skipped. Before it trains, a resuming ``fit`` is checked
        against the run (:mod:`raymodule.checkpoint.continuity`): another symbol (parameter names or
        shapes), optimizer type or global batch size, optimizer states for other parameters,
        or ``train_data`` shorter than the resume position raise
        :class:`raymodule.ResumeMismatch`. The learning rate, other optimizer hyperparameters
        and the schedule's settings are this call's (a Tune trial's new config takes effect):
        only the optimizer's state and update count come from the checkpoint.

        A run is also elastic: it goes on through lost workers within ``run.min_workers`` and
        ``run.max_failures`` (the survivors run the failed step again; replacements join when
        they can), and from its latest checkpoint when every worker is lost. Without ``run``, a
        lost worker raises :class:`raymodule.WorkerLostError`.
        """
        check_kvstore(kvstore)
        if num_epoch is None:
            raise ValueError("fit: num_epoch is required")
        run_folder = None
        if run is not None:
            if not isinstance(run, RunConfig):
                raise TypeError(f"run={run!r}: expected a raymodule.RunConfig")
            static = {"world_size": len(self._context), "work_load_list": self._work_load_list}
            run_folder = Run(run, Settings.from_env(), static)
            runtime.ensure_ray()  # before the run notes SIGTERM: ray.init sets a handler too
        if validation_metric is None:
            validation_metric = eval_metric
        if not isinstance(eval_metric, mx.metric.EvalMetric):
            eval_metric = mx.metric.create(eval_metric)
        resume = run_folder.resume_from if run_folder is not None else None
        fresh_data = True  # train_data is where the caller left it (not reset by a restart)
        # a DatasetIter's pass at begin_epoch: a restart goes back to the pass of its epoch
        first_pass = train_data.epoch if isinstance(train_data, data.DatasetIter) else None
        failures_before = 0
        with run_folder if run_folder is not None else contextlib.nullcontext():
            while True:
                try:
                    return self._fit_run(
                        train_data, eval_data, eval_metric, validation_metric,
                        epoch_end_callback, batch_end_callback, eval_end_callback,
                        eval_batch_end_callback, kvstore, optimizer, optimizer_params,
                        initializer, arg_params, aux_params, allow_missing, force_rebind,
                        force_init, begin_epoch, num_epoch, monitor, sparse_row_id_fn,
                        run_folder, resume, fresh_data, failures_before,
                    )  # fmt: skip
                except EveryWorkerLost as lost:
                    if run_folder is not None and run_folder.preempted:
                        message = f"{lost}; the process received SIGTERM: not restarting"
                        raise Preempted(message) from None
                    resume = run_folder.latest() if run_folder is not None else None
                    if resume is None:
                        raise WorkerLostError(f"{lost}; no checkpoint to restart from") from None
                    self.logger.warning(
                        "every worker was lost (%s); restarting them from %s", lost, resume.name
                    )
                    failures_before = self._workers.failures  # max_failures spans the restarts
                    run_folder.record_event(
                        {
                            "event": "membership",
                            "change": "restarted",
                            "why": str(lost),
                            "world_size": len(self._context),
                            "previous_world_size": self._workers.world_size,
                            "from_checkpoint": resume.name,
                            "during_epoch": resume.epoch,
                        }
                    )
                    self.close()
                    self.optimizer_initialized = False
                    if first_pass is not None:  # its order is the pass's: that epoch's again
                        train_data.begin_pass(first_pass + resume.epoch - begin_epoch)
                    else:
                        train_data.reset()
                    fresh_data, force_rebind = False, True

    def _fit_run(
        self, train_data, eval_data, eval_metric, validation_metric, epoch_end_callback,
        batch_end_callback, eval_end_callback, eval_batch_end_callback, kvstore, optimizer,
        optimizer_params, initializer, arg_params, aux_params, allow_missing, force_rebind,
        force_init, begin_epoch, num_epoch, monitor, sparse_row_id_fn, run_folder, resume,
        fresh_data, failures_before,
    ):  # fmt: skip
        """``fit`` from binding on; ``resume`` is the checkpoint to continue from, if any, and
        ``fresh_data`` whether ``train_data`` still needs the resets of the finished epochs."""
        self.bind(
            data_shapes=train_data.provide_data,
            label_shapes=train_data.provide_label,
            for_training=True,
            force_rebind=force_rebind,
        )
        desc = self.data_shapes[0]
        batch_size = desc.shape[mx.io.DataDesc.get_batch_axis(desc.layout)]
        if resume is not None:
            continuity.check(
                resume,
                run_folder.config.name,
                params=self._param_shapes(),
                optimizer=continuity.optimizer_type(optimizer),
                batch_size=batch_size,
            )
            continuity.check_epoch_length(
                resume, run_folder.config.name, continuity.batches_in(train_data)
            )
        per_epoch = resume.manifest.get("batches_per_epoch") if resume is not None else None
        if monitor is not None:
            self.install_monitor(monitor)
        if resume is not None:
            arg_params, aux_params = data.split_params(mx.nd.load_frombuffer(resume.params_file()))
            allow_missing, force_init = False, True
        self.init_params(
            initializer=initializer,
            arg_params=arg_params,
            aux_params=aux_params,
            allow_missing=allow_missing,
            force_init=force_init,
        )
        self.init_optimizer(kvstore=kvstore, optimizer=optimizer, optimizer_params=optimizer_params)
        workers = self._workers
        first_batch, global_step = 0, 0
        if resume is not None:
            workers.post("restore_optimizer", self._snapshot_id, *resume.optimizer())
            if fresh_data:
                for _ in range(resume.epoch - begin_epoch):  # the resets finished epochs made
                    train_data.reset()
            begin_epoch, first_batch, global_step = resume.epoch, resume.batch, resume.global_step
            if begin_epoch >= num_epoch:
                self.logger.info("the run is complete: %d of %d epochs", begin_epoch, num_epoch)
        every = run_folder.config.checkpoint_every if run_folder is not None else 0
        epoch = begin_epoch
        if run_folder is not None:
            self._elastic(run_folder, lambda: epoch, failures_before)
        # the workers count steps from 0 on their own; the run's steps go on from global_step
        offset = global_step - workers.steps_sent

        def checkpoint(epoch: int, batch: int, steps: int) -> None:
            # worker 0's copy, taken after the steps sent so far: every replica is at this step
            # (None if a step before failed: it is run again and the checkpoint skipped)
            snapshot = self._workers.snapshot(self._snapshot_id, steps)
            run_folder.checkpoint(
                snapshot,
                self._checkpoint_files(),
                epoch=epoch,
                batch=batch,
                global_step=steps + offset,
                batch_size=batch_size,
                batches_per_epoch=per_epoch,
            )

        try:
            for epoch in range(begin_epoch, num_epoch):
                tic = time.time()
                eval_metric.reset()
                done = run_steps(
                    self,
                    train_data,
                    "train_step",
                    eval_metric,
                    epoch,
                    batch_end_callback,
                    monitor=monitor,
                    sparse_row_id_fn=sparse_row_id_fn,
                    first_batch=first_batch,
                    checkpoint_every=every,
                    on_checkpoint=lambda n, steps, e=epoch: checkpoint(e, n, steps),
                    stop=(lambda: run_folder.preempted) if run_folder is not None else None,
                )
                if resume is not None and epoch == begin_epoch:  # its length known only now
                    continuity.check_epoch_length(resume, run_folder.config.name, done.batches)
                per_epoch = done.batches
                if run_folder is not None:
                    checkpoint(epoch + 1, 0, self._workers.steps_sent)
                self._params_dirty = True
                toc = time.time() - tic
                for name, val in done.name_values:
                    self.logger.info("Epoch[%d] Train-%s=%f", epoch, name, val)
                self.logger.info("Epoch[%d] Time cost=%.3f", epoch, toc)

                arg_params, aux_params = self.get_params()
                if epoch_end_callback is not None:
                    for callback in _as_list(epoch_end_callback):
                        callback(epoch, self.symbol, arg_params, aux_params)
                validation = []
                if eval_data is not None:
                    validation = self.score(
                        eval_data,
                        validation_metric,
                        score_end_callback=eval_end_callback,
                        batch_end_callback=eval_batch_end_callback,
                        epoch=epoch,
                    )
                    for name, val in validation:
                        self.logger.info("Epoch[%d] Validation-%s=%f", epoch, name, val)
                if run_folder is not None:
                    run_folder.record_epoch(
                        {
                            "epoch": epoch,
                            "global_step": self._workers.steps_sent + offset,
                            "batches": done.batches - first_batch,
                            "resumed_at_batch": first_batch,
                            "seconds": round(toc, 3),
                            "samples_per_s": round(done.samples / toc, 1) if toc > 0 else None,
                            "world_size": self._workers.world_size,
                            "step_seconds": [
                                round(done.step_seconds[k], 3) for k in sorted(done.step_seconds)
                            ],
                            "train": dict(done.name_values),
                            "validation": dict(validation),
                        }
                    )
                first_batch = 0
                train_data.reset()
        finally:
            if self._workers is not None:
                self._workers.end_run()

    def _elastic(self, run_folder: Run, epoch, failures_before: int) -> None:
        """Makes the workers go on through lost workers within the run's limits
        (``failures_before`` failures already, before this run restarted its workers), recording
        each membership change in the run's metrics (``epoch()``: the epoch it happens in)."""
        config = run_folder.config
        workers = self._workers
        workers.on_membership = lambda event: run_folder.record_event(
            dict(event, during_epoch=epoch())
        )
        limits = policy.Limits(
            len(self._context),
            config.min_workers,
            config.max_failures,
            elastic=True,
            max_reforms=workers.settings.max_reforms,
        )
        workers.configure(limits, failures_before)

    def iter_predict(self, eval_data, num_batch=None, reset=True, sparse_row_id_fn=None):
        """MXNet's ``iter_predict``: yields ``(outputs, nbatch, eval_batch)`` per batch, the
        outputs without the batch's padding. The forward passes run on the workers several
        batches per call, ahead of the caller (as :meth:`score`'s do); a
        :class:`raymodule.data.DatasetIter`'s rows are read on the workers, and its
        ``eval_batch`` holds its indices (and an ArrayDataset's labels), not its data.
        Breaking out of the loop lets the passes in flight finish unread."""
        if not (self.binded and self.params_initialized):
            raise CallOrderError("iter_predict: call bind() and init_params() first")
        if reset:
            eval_data.reset()
        # an ArrayDataset's labels are at hand in the client (a RecordIO file's are not)
        in_memory = isinstance(eval_data, data.DatasetIter) and isinstance(
            eval_data.dataset, data.ArrayDataset
        )
        stream = steps(
            self,
            eval_data,
            "eval_step",
            None,
            0,
            Epoch([], 0, 0, {}),
            num_batch=num_batch,
            sparse_row_id_fn=sparse_row_id_fn,
        )
        with contextlib.closing(stream):
            for step, per_worker, _ in stream:
                target = step.target
                outputs = target._merge("outputs", per_worker, target._output_axes, True)
                batch = step.data_batch
                if in_memory and step.index is not None and eval_data.dataset.label_descs:
                    batch.label = eval_data._arrays(
                        eval_data.dataset.take(step.index)[1], eval_data.dataset.label_descs
                    )
                yield [out[0 : out.shape[0] - batch.pad] for out in outputs], step.nbatch, batch

    def predict(
        self,
        eval_data,
        num_batch=None,
        merge_batches=True,
        reset=True,
        always_output_list=False,
        sparse_row_id_fn=None,
    ):
        """MXNet's ``predict``, over :meth:`iter_predict` (several batches per call to the
        workers); an array (not a ``DataIter``) is one forward pass, as in MXNet."""
        if not isinstance(eval_data, mx.io.DataIter):
            return super().predict(
                eval_data, num_batch, merge_batches, reset, always_output_list, sparse_row_id_fn
            )
        if not (self.binded and self.params_initialized):
            raise CallOrderError("predict: call bind() and init_params() first")
        batches = [
            outputs
            for outputs, _, _ in self.iter_predict(eval_data, num_batch, reset, sparse_row_id_fn)
        ]
        if not batches or not merge_batches:
            return batches
        count = len(batches[0])
        if any(len(outputs) != count for outputs in batches):
            raise AssertionError(  # MXNet's words and type
                "Cannot merge batches, as num of outputs is not the same in mini-batches. "
                "Maybe bucketing is used?"
            )
        merged = [mx.nd.concatenate([outputs[i] for outputs in batches]) for i in range(count)]
        return merged[0] if count == 1 and not always_output_list else merged

    def score(
        self,
        eval_data,
        eval_metric,
        num_batch=None,
        batch_end_callback=None,
        score_end_callback=None,
        reset=True,
        epoch=0,
        sparse_row_id_fn=None,
    ):
        """MXNet's ``score``; the forward passes and metric updates run on the workers."""
        if not (self.binded and self.params_initialized):
            raise CallOrderError("score: call bind() and init_params() first")
        if reset:
            eval_data.reset()
        if not isinstance(eval_metric, mx.metric.EvalMetric):
            eval_metric = mx.metric.create(eval_metric)
        eval_metric.reset()
        run_steps(
            self,
            eval_data,
            "eval_step",
            eval_metric,
            epoch,
            batch_end_callback,
            num_batch=num_batch,
            score_end_callback=score_end_callback,
            sparse_row_id_fn=sparse_row_id_fn,
        )
        return eval_metric.get_name_value()
