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
import time
from collections import deque
from dataclasses import dataclass

import mxnet as mx
import ray
from mxnet.base import _as_list
from mxnet.initializer import Uniform
from mxnet.model import BatchEndParam

from . import data, metrics
from .constants import Settings
from .errors import CallOrderError
from .kvstore import check_kvstore
from .run import Run, RunConfig

__all__ = ["TrainingLoops", "run_steps", "Epoch"]


@dataclass
class Epoch:
    """What :func:`run_steps` did: the metric after the last batch, the batches of the epoch
    done (skipped ones included) and the samples it ran."""

    name_values: list
    batches: int
    samples: int


def run_steps(
    module,
    data_iter,
    method,
    metric,
    epoch,
    batch_end_callback,
    *,
    monitor=None,
    num_batch=None,
    score_end_callback=None,
    sparse_row_id_fn=None,
    first_batch=0,
    checkpoint_every=0,
    on_checkpoint=None,
):
    """Runs ``method`` ("train_step" or "eval_step") on every batch of ``data_iter``.

    ``module._step_module(data_batch, flush)`` gives the :class:`raymodule.Module` that runs a
    batch (a bucketing module's bucket, reshaped to the batch when needed); it calls
    ``flush()`` before it changes how batches already queued would be split.

    The first ``first_batch`` batches are read and skipped (they were trained before a run
    resumed). Every ``checkpoint_every`` batches, ``on_checkpoint(nbatch)`` is called once the
    steps before batch ``nbatch`` are sent and before any later one is, so a worker call it
    makes sees the state after exactly ``nbatch`` batches; it is called only when another
    batch follows (the epoch's end has its own checkpoint).

    Returns an :class:`Epoch`.
    """
    workers = module._workers
    workers.sync()
    workers.post("set_metric", metric)
    on_workers = metrics.runs_on_workers(metric)
    if monitor is not None:  # statistics are collected step by step, as MXNet does
        per_call, depth = 1, 0
    else:
        per_call = workers.settings.steps_per_call
        depth = workers.settings.pipeline_depth
    inflight: deque = deque()
    chunk: list = []
    final: list = []
    done = 0

    def send() -> None:
        if not chunk:
            return
        if monitor is not None:
            monitor.tic()
        mids = [target._id for _, _, _, target in chunk]
        refs = workers.submit("steps", method, mids, ray.put([b for _, _, b, _ in chunk]))
        inflight.append((list(chunk), refs))
        chunk.clear()

    def finish(last_chunk: bool) -> None:
        nonlocal done
        steps, refs = inflight.popleft()
        per_worker = workers.get(refs, method)
        for index, (nbatch, data_batch, batch, target) in enumerate(steps):
            results = [worker_results[index] for worker_results in per_worker]
            if on_workers:
                for increments in results:
                    metrics.add_counters(metric, increments)
            else:
                labels = [batch.worker_slice(part)[1] for part in target._slices]
                metrics.update_per_slice(
                    metric, target.label_names, target.output_names, labels, results
                )
            if monitor is not None:
                monitor.toc_print()
            if last_chunk and index == len(steps) - 1:
                final.extend(metric.get_global_name_value())
            _call_back(batch_end_callback, module, data_iter, data_batch, epoch, nbatch, metric)
            done += 1

    end, samples = first_batch, 0
    for nbatch, data_batch in enumerate(data_iter):
        if num_batch is not None and nbatch == num_batch:
            break
        if nbatch < first_batch:
            continue
        if checkpoint_every and nbatch > first_batch and nbatch % checkpoint_every == 0:
            send()
            on_checkpoint(nbatch)
        end = nbatch + 1
        target = module._step_module(data_batch, flush=send)
        target.prepare(data_batch, sparse_row_id_fn=sparse_row_id_fn)
        batch = target._batch(data_batch)
        samples += batch.data[0].shape[batch.data_axes[0]] if batch.data else 0
        chunk.append((nbatch, data_batch, batch, target))
        if len(chunk) >= per_call:
            send()
            while len(inflight) > depth:
                finish(last_chunk=False)
    send()
    while inflight:
        finish(last_chunk=len(inflight) == 1)

    _call_back(score_end_callback, module, data_iter, None, epoch, done, metric)
    return Epoch(final, end, samples)


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
    optimizer) and ``_checkpoint_files()`` (the files that describe the model in a run
    checkpoint, by name).
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
        parameters, optimizer state, learning-rate schedule and position in the data. For the
        same data order, pass ``train_data`` as a fresh iterator (as a new process makes it):
        it is reset once per completed epoch and the batches already trained are skipped.
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
        with run_folder if run_folder is not None else contextlib.nullcontext():
            self.bind(
                data_shapes=train_data.provide_data,
                label_shapes=train_data.provide_label,
                for_training=True,
                force_rebind=force_rebind,
            )
            if monitor is not None:
                self.install_monitor(monitor)
            resume = run_folder.resume_from if run_folder is not None else None
            if resume is not None:
                arg_params, aux_params = data.split_params(
                    mx.nd.load_frombuffer(resume.params_file())
                )
                allow_missing, force_init = False, True
            self.init_params(
                initializer=initializer,
                arg_params=arg_params,
                aux_params=aux_params,
                allow_missing=allow_missing,
                force_init=force_init,
            )
            self.init_optimizer(
                kvstore=kvstore, optimizer=optimizer, optimizer_params=optimizer_params
            )
            first_batch, global_step = 0, 0
            if resume is not None:
                self._workers.post("restore_optimizer", self._snapshot_id, *resume.optimizer())
                for _ in range(resume.epoch - begin_epoch):  # the resets the finished epochs made
                    train_data.reset()
                begin_epoch, first_batch, global_step = (
                    resume.epoch,
                    resume.batch,
                    resume.global_step,
                )
                if begin_epoch >= num_epoch:
                    self.logger.info("the run is complete: %d of %d epochs", begin_epoch, num_epoch)
            if validation_metric is None:
                validation_metric = eval_metric
            if not isinstance(eval_metric, mx.metric.EvalMetric):
                eval_metric = mx.metric.create(eval_metric)
            every = run_folder.config.checkpoint_every if run_folder is not None else 0

            def checkpoint(epoch: int, batch: int, step: int) -> None:
                # worker 0's copy, taken after the steps sent so far: every replica is at this step
                snapshot = self._workers.submit("snapshot", self._snapshot_id, ranks=[0])[0]
                run_folder.checkpoint(
                    snapshot, self._checkpoint_files(), epoch=epoch, batch=batch, global_step=step
                )

            for epoch in range(begin_epoch, num_epoch):
                tic = time.time()
                eval_metric.reset()
                epoch_start = global_step - first_batch
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
                    on_checkpoint=lambda n, e=epoch, s=epoch_start: checkpoint(e, n, s + n),
                )
                global_step = epoch_start + done.batches
                if run_folder is not None:
                    checkpoint(epoch + 1, 0, global_step)
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
                            "global_step": global_step,
                            "batches": done.batches - first_batch,
                            "resumed_at_batch": first_batch,
                            "seconds": round(toc, 3),
                            "samples_per_s": round(done.samples / toc, 1) if toc > 0 else None,
                            "world_size": len(self._context),
                            "train": dict(done.name_values),
                            "validation": dict(validation),
                        }
                    )
                first_batch = 0
                train_data.reset()

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
