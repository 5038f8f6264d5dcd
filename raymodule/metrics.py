"""Evaluation metrics across workers.

MXNet updates a metric once per device slice. A metric whose whole state is its four counters
(``sum_metric``, ``num_inst`` and their ``global_`` twins) is therefore updated on the workers
and only the counters' increments travel back; any other metric (F1, MCC, PCC, ...) gets the
outputs and updates on the client, one slice per worker, as MXNet would.
"""

from __future__ import annotations

from collections import OrderedDict

import mxnet as mx

from .data import to_ndarray

__all__ = ["runs_on_workers", "counters", "add_counters", "update_per_slice"]

_COUNTER_ONLY = (
    mx.metric.Accuracy,
    mx.metric.TopKAccuracy,
    mx.metric.Perplexity,
    mx.metric.MAE,
    mx.metric.MSE,
    mx.metric.RMSE,
    mx.metric.CrossEntropy,
    mx.metric.NegativeLogLikelihood,
    mx.metric.Loss,
    mx.metric.CustomMetric,
)


def _leaves(metric: mx.metric.EvalMetric) -> list[mx.metric.EvalMetric]:
    if isinstance(metric, mx.metric.CompositeEvalMetric):
        return [leaf for child in metric.metrics for leaf in _leaves(child)]
    return [metric]


def runs_on_workers(metric: mx.metric.EvalMetric) -> bool:
    return all(type(leaf) in _COUNTER_ONLY for leaf in _leaves(metric))


def counters(metric: mx.metric.EvalMetric) -> list[tuple]:
    """The counters of every leaf metric, in a fixed order."""
    return [
        (leaf.sum_metric, leaf.num_inst, leaf.global_sum_metric, leaf.global_num_inst)
        for leaf in _leaves(metric)
    ]


def add_counters(metric: mx.metric.EvalMetric, increments: list[tuple]) -> None:
    for leaf, (s, n, gs, gn) in zip(_leaves(metric), increments):
        leaf.sum_metric += s
        leaf.num_inst += n
        leaf.global_sum_metric += gs
        leaf.global_num_inst += gn


def update_per_slice(metric, label_names, output_names, labels_per_worker, outputs_per_worker):
    """``metric.update_dict`` once per worker slice, as MXNet's executor group does per device."""
    for labels, outputs in zip(labels_per_worker, outputs_per_worker):
        metric.update_dict(
            OrderedDict(zip(label_names, [to_ndarray(x) for x in labels])),
            OrderedDict(zip(output_names, [to_ndarray(x) for x in outputs])),
        )
