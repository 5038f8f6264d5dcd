"""``fit``, ``score``, ``predict`` and ``iter_predict`` of raymodule's modules: MXNet's, over
the step stream of :mod:`raymodule.steps` (the steps run on the workers, the callbacks in the
client), with run checkpoints, resuming and elastic limits for ``fit``.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

import mxnet as mx
from mxnet.base import _as_list
from mxnet.initializer import Uniform

from . import data, runtime
from .checkpoint import continuity
from .constants import Settings
from .context import floor_of
from .controller import EveryWorkerLost, policy
from .errors import CallOrderError, Preempted, WorkerLostError
from .kvstore import check_kvstore
from .run import Run, RunConfig
from .steps import Epoch, run_steps, steps

__all__ = ["TrainingLoops"]


class TrainingLoops:
    """``fit`` and ``score`` of raymodule's modules: MXNet's, with the steps on the workers.

    A module using them provides, besides MXNet's intermediate API: ``_workers``,
    ``_context``, ``_work_load_list``, ``_step_module(data_batch, flush)`` (see
    :func:`run_steps`), ``_snapshot_id`` (the module whose replicas hold every parameter and the
    optimizer), ``_checkpoint_files()`` (the files that describe the model in a run
    checkpoint, by name) and ``_param_shapes()`` (the bound parameters' shapes, by name).
    """

    _run_floor: int | None = None  # while an elastic fit binds: the floor its workers start with

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

        A plain ``mx.io.NDArrayIter`` (dense arrays) is read as a
        :class:`raymodule.data.DatasetIter` would be: its arrays are put in the object store
        once, the workers read the rows of each batch, and its order is its own
        (:mod:`raymodule.data.ndarrayiter`). The callbacks' ``data_batch`` reads its arrays
        only when asked for them.

        A run is also elastic: it goes on through lost workers within ``run.min_workers`` and
        ``run.max_failures`` (the survivors run the failed step again; replacements join when
        they can), and from its latest checkpoint when every worker is lost. Without ``run``, a
        lost worker raises :class:`raymodule.WorkerLostError`.
        """
        check_kvstore(kvstore)
        if num_epoch is None:
            raise ValueError("fit: num_epoch is required")
        if run is not None and not isinstance(run, RunConfig):
            raise TypeError(f"run={run!r}: expected a raymodule.RunConfig")
        if validation_metric is None:
            validation_metric = eval_metric
        if not isinstance(eval_metric, mx.metric.EvalMetric):
            eval_metric = mx.metric.create(eval_metric)
        fresh_data = True  # train_data is where the caller left it (not reset by a restart)
        # a DatasetIter's pass at begin_epoch: a restart goes back to the pass of its epoch
        first_pass = train_data.epoch if isinstance(train_data, data.DatasetIter) else None
        reads_datasets = getattr(self, "_reads_datasets", False)
        if monitor is None and eval_data is not train_data and reads_datasets:
            # a plain NDArrayIter: the workers read its rows, in its order (score resets
            # eval_data: the same iterator would be shuffled where these do not see it)
            train_data = data.rows_of(train_data) or train_data
        # the run takes its folder's lease last: from here on every way out releases it
        run_folder = None
        if run is not None:
            static = {"world_size": len(self._context), "work_load_list": self._work_load_list}
            run_folder = Run(run, Settings.from_env(), static)
            try:
                runtime.ensure_ray()  # before the run notes SIGTERM: ray.init sets a handler too
            except BaseException:
                run_folder.close(raise_failures=False)
                raise
        resume = run_folder.resume_from if run_folder is not None else None
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
                        during = lost.during_epoch  # None: lost before training began
                        if during is None:
                            during = resume.epoch if resume is not None else begin_epoch
                        run_folder.record_event(
                            {
                                "event": "membership",
                                "change": "lost",
                                "why": message,
                                "world_size": 0,
                                "previous_world_size": self._workers.world_size,
                                "during_epoch": during,
                            }
                        )
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
        self._run_floor = run_folder.config.min_workers if run_folder is not None else None
        try:
            self.bind(
                data_shapes=train_data.provide_data,
                label_shapes=train_data.provide_label,
                for_training=True,
                force_rebind=force_rebind,
            )
        finally:
            self._run_floor = None
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

        def checkpoint(epoch: int, batch: int, steps: int, snapshot=None) -> None:
            # worker 0's copy, taken after the steps sent so far (or by the controller, running
            # a plan): every replica is at this step (None if a step before failed: it is run
            # again and the checkpoint skipped)
            if snapshot is None:
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
                    on_checkpoint=partial(checkpoint, epoch),
                    stop=(lambda: run_folder.preempted) if run_folder is not None else None,
                    params_at_end=epoch_end_callback is not None,
                )
                if resume is not None and epoch == begin_epoch:  # its length known only now
                    continuity.check_epoch_length(resume, run_folder.config.name, done.batches)
                per_epoch = done.batches
                if run_folder is not None:
                    checkpoint(epoch + 1, 0, self._workers.steps_sent)
                toc = time.time() - tic
                for name, val in done.name_values:
                    self.logger.info("Epoch[%d] Train-%s=%f", epoch, name, val)
                self.logger.info("Epoch[%d] Time cost=%.3f", epoch, toc)

                if epoch_end_callback is not None:  # else read when asked: a copy less an epoch
                    arg_params, aux_params = self.get_params()
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
        except EveryWorkerLost as lost:
            lost.during_epoch = epoch
            raise
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
            config.min_workers if config.min_workers is not None else floor_of(self._context),
            config.max_failures,
            elastic=True,
            max_reforms=workers.settings.max_reforms,
        )
        workers.configure(limits, failures_before, sigterm=lambda: run_folder.preempted)

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
