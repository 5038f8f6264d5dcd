"""The step loop of ``fit`` and ``score``: batches streamed ahead to the workers.

The client reads the ``DataIter`` and sends the workers chunks of ``RAYMODULE_STEPS_PER_CALL``
consecutive global batches, one object-store transfer and one call per chunk; up to
``RAYMODULE_PIPELINE_DEPTH`` chunks are in flight (the bounded queue), so workers do not wait
for the client. Results come back in order: metric increments are merged into the user's
metric and the callbacks run, trailing the workers by at most the batches in flight.
"""

from __future__ import annotations

from collections import deque

import ray
from mxnet.base import _as_list
from mxnet.model import BatchEndParam

from . import metrics

__all__ = ["run_steps"]


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

    The first ``first_batch`` batches are read and skipped (they were trained before a run
    resumed). Every ``checkpoint_every`` batches, ``on_checkpoint(nbatch)`` is called once the
    steps before batch ``nbatch`` are sent and before any later one is, so a worker call it
    makes sees the state after exactly ``nbatch`` batches; it is called only when another
    batch follows (the epoch's end has its own checkpoint).

    Returns the metric's global name/value pairs as they stood after the last batch, and the
    number of batches of the epoch done (the skipped ones included).
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
        refs = workers.submit("steps", method, module._id, ray.put([b for _, _, b in chunk]))
        inflight.append((list(chunk), module._slices, refs))
        chunk.clear()

    def finish(last_chunk: bool) -> None:
        nonlocal done
        steps, slices, refs = inflight.popleft()
        per_worker = workers.get(refs, method)
        for index, (nbatch, data_batch, batch) in enumerate(steps):
            results = [worker_results[index] for worker_results in per_worker]
            if on_workers:
                for increments in results:
                    metrics.add_counters(metric, increments)
            else:
                labels = [batch.worker_slice(part)[1] for part in slices]
                metrics.update_per_slice(
                    metric, module.label_names, module.output_names, labels, results
                )
            if monitor is not None:
                monitor.toc_print()
            if last_chunk and index == len(steps) - 1:
                final.extend(metric.get_global_name_value())
            _call_back(batch_end_callback, module, data_iter, data_batch, epoch, nbatch, metric)
            done += 1

    end = first_batch
    for nbatch, data_batch in enumerate(data_iter):
        if num_batch is not None and nbatch == num_batch:
            break
        if nbatch < first_batch:
            continue
        if checkpoint_every and nbatch > first_batch and nbatch % checkpoint_every == 0:
            send()
            on_checkpoint(nbatch)
        end = nbatch + 1
        module.prepare(data_batch, sparse_row_id_fn=sparse_row_id_fn)
        if module._shapes_changed(data_batch):
            send()  # the chunk so far was split for the old shapes
            module._reshape_for(data_batch)
        chunk.append((nbatch, data_batch, module._batch(data_batch)))
        if len(chunk) >= per_call:
            send()
            while len(inflight) > depth:
                finish(last_chunk=False)
    send()
    while inflight:
        finish(last_chunk=len(inflight) == 1)

    _call_back(score_end_callback, module, data_iter, None, epoch, done, metric)
    return final, end


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
