"""The step loop of ``fit`` and ``score``: batches streamed ahead to the workers.

The client reads the ``DataIter``, puts each global batch in the object store once and submits
the step to every worker without waiting; up to ``RAYMODULE_PIPELINE_DEPTH`` steps are in
flight (the bounded queue), so workers never wait for the client. Results come back in order:
metric increments are merged into the user's metric and the callbacks run, trailing the
workers by at most that many batches.
"""

from __future__ import annotations

from collections import deque

import ray
from mxnet.base import _as_list
from mxnet.model import BatchEndParam

from . import constants, metrics

__all__ = ["run_steps"]


def run_steps(module, data_iter, method, metric, epoch, batch_end_callback, *, monitor=None,
              num_batch=None, score_end_callback=None, sparse_row_id_fn=None):
    """Runs ``method`` ("train_step" or "eval_step") on every batch of ``data_iter``.

    Returns the metric's global name/value pairs as they stood after the last batch.
    """
    workers = module._workers
    workers.sync()
    workers.post("set_metric", metric)
    on_workers = metrics.runs_on_workers(metric)
    depth = 0 if monitor is not None else constants.env_int(constants.PIPELINE_DEPTH)
    inflight: deque = deque()
    final: list = []

    def finish(is_last: bool) -> None:
        nbatch, data_batch, batch, slices, refs = inflight.popleft()
        results = workers.get(refs, method)
        if on_workers:
            for increments in results:
                metrics.add_counters(metric, increments)
        else:
            labels = [batch.worker_slice(part)[1] for part in slices]
            metrics.update_per_slice(metric, module.label_names, module.output_names,
                                     labels, results)
        if monitor is not None:
            monitor.toc_print()
        if is_last:
            final.extend(metric.get_global_name_value())
        if batch_end_callback is not None:
            params = BatchEndParam(epoch=epoch, nbatch=nbatch, eval_metric=metric,
                                   locals=_locals(module, data_iter, data_batch, epoch, nbatch,
                                                  metric))
            for callback in _as_list(batch_end_callback):
                callback(params)

    def batches():
        for nbatch, data_batch in enumerate(data_iter):
            if num_batch is not None and nbatch == num_batch:
                return
            yield nbatch, data_batch

    stream = batches()
    upcoming = next(stream, None)
    done = 0
    while upcoming is not None:
        nbatch, data_batch = upcoming
        module.prepare(data_batch, sparse_row_id_fn=sparse_row_id_fn)
        batch = module._batch(data_batch)
        if monitor is not None:
            monitor.tic()
        refs = workers.submit(method, module._id, ray.put(batch))
        inflight.append((nbatch, data_batch, batch, module._slices, refs))
        upcoming = next(stream, None)  # read ahead while the workers compute
        while inflight and (len(inflight) > depth or upcoming is None):
            finish(is_last=upcoming is None and len(inflight) == 1)
            done += 1

    if score_end_callback:
        params = BatchEndParam(epoch=epoch, nbatch=done, eval_metric=metric,
                               locals=_locals(module, data_iter, None, epoch, done, metric))
        for callback in _as_list(score_end_callback):
            callback(params)
    return final


def _locals(module, data_iter, data_batch, epoch, nbatch, metric) -> dict:
    """What MXNet's loops expose to callbacks through ``BatchEndParam.locals``."""
    return {"self": module, "data_batch": data_batch, "data_iter": data_iter, "epoch": epoch,
            "nbatch": nbatch, "eval_metric": metric}
