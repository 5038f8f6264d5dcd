"""A resume checked against the run it continues.

Each checkpoint's manifest records what a ``fit`` must keep to go on from it: ``params``, the
symbol's parameters (``arg:<name>``, ``aux:<name>``) with their shapes; ``optimizer.type``;
``batch_size``, the global batch; and ``batches_per_epoch`` once an epoch has completed. A
``fit`` that resumes is compared with the first three before it trains, and with the fourth
before it trains when its data says how long an epoch is (:func:`batches_in`), else at the end
of the first epoch it completes (before that epoch's checkpoint); one that differs raises
:class:`raymodule.errors.ResumeMismatch` naming the field, the checkpoint's value and the new
one. A manifest written before a field was recorded is not checked for that field.
Learning rates and other hyperparameters may change: the resuming ``fit`` sets them.
"""

from __future__ import annotations

import logging

from ..errors import ResumeMismatch

__all__ = ["check", "check_epoch_length", "batches_in", "optimizer_type", "param_shapes"]

log = logging.getLogger(__name__)

_WHAT = {"params": "symbol", "optimizer": "optimizer", "batch_size": "global batch size"}


def param_shapes(arg_params: dict, aux_params: dict) -> dict[str, list[int]]:
    """The ``params`` a manifest records for these parameters (arrays by name)."""
    shapes = {f"arg:{name}": list(array.shape) for name, array in arg_params.items()}
    shapes.update({f"aux:{name}": list(array.shape) for name, array in aux_params.items()})
    return shapes


def optimizer_type(optimizer) -> str | None:
    """The class name of the optimizer ``fit(optimizer=...)`` makes (a name or an instance),
    as a checkpoint records it; None for a name MXNet does not know (``fit`` says so)."""
    import mxnet as mx

    if isinstance(optimizer, mx.optimizer.Optimizer):
        return type(optimizer).__name__
    made = mx.optimizer.Optimizer.opt_registry.get(str(optimizer).lower())
    return made.__name__ if made is not None else None


def batches_in(data_iter) -> int | None:
    """Batches an epoch of ``data_iter`` gives, when it says without being read (MXNet's
    ``NDArrayIter`` or a :class:`raymodule.data.DatasetIter` that pads or discards its last
    batch), else None."""
    import mxnet as mx

    from ..data import DatasetIter

    if not isinstance(data_iter, (mx.io.NDArrayIter, DatasetIter)):
        return None
    full, rest = divmod(data_iter.num_data, data_iter.batch_size)
    if data_iter.last_batch_handle == "pad":
        return full + (rest > 0)
    if data_iter.last_batch_handle == "discard":
        return full
    return None  # roll_over: it depends on the epoch


def check_epoch_length(checkpoint, run_name: str, batches: int | None) -> None:
    """Raises ``ResumeMismatch`` if an epoch of the resuming ``fit``'s data has ``batches``
    batches (None: not known) where the run's epochs had another number."""
    recorded = checkpoint.manifest.get("batches_per_epoch")
    if recorded is None or batches is None or batches == recorded:
        return
    raise ResumeMismatch(
        f"run {run_name!r} cannot resume from {checkpoint.name}: its epochs had {recorded} "
        f"batches, an epoch of this fit's train_data has {batches}: it is not the data the run "
        "was trained on. Resume with that data, or start a new run: another "
        "RunConfig(name=...) (with resume='never' to be sure it is new)"
    )


def check(checkpoint, run_name: str, *, params: dict, optimizer: str | None, batch_size: int):
    """Raises ``ResumeMismatch`` if the ``fit`` resuming run ``run_name`` from ``checkpoint``
    (a :class:`raymodule.checkpoint.Checkpoint`) has other parameters (:func:`param_shapes`),
    another ``optimizer`` type or another global ``batch_size`` than the run had."""
    recorded = checkpoint.manifest
    found = {
        "params": recorded.get("params"),
        "optimizer": (recorded.get("optimizer") or {}).get("type"),
        "batch_size": recorded.get("batch_size"),
    }
    now = {"params": params, "optimizer": optimizer, "batch_size": batch_size}
    for field, then in found.items():
        if then is None or now[field] is None:
            log.debug("run %r: %s records no %s; not checked", run_name, checkpoint.name, field)
            continue
        difference = _params_differ(then, now[field]) if field == "params" else None
        if field != "params" and then != now[field]:
            difference = f"the checkpoint's {field} is {then!r}, this fit's {now[field]!r}"
        if difference is not None:
            raise ResumeMismatch(
                f"run {run_name!r} cannot resume from {checkpoint.name}: {difference}. Resume "
                f"with the {_WHAT[field]} the run was trained with, or start a new run: another "
                "RunConfig(name=...) (with resume='never' to be sure it is new)"
            )


def _params_differ(then: dict, now: dict) -> str | None:
    """How the symbol's parameters differ from the checkpoint's, in words, or None."""
    missing, extra = sorted(set(then) - set(now)), sorted(set(now) - set(then))
    reshaped = [
        f"{name} {tuple(then[name])} in the checkpoint, {tuple(now[name])} in this fit"
        for name in sorted(set(then) & set(now))
        if list(then[name]) != list(now[name])
    ]
    parts = []
    if missing:
        parts.append(f"the checkpoint's {', '.join(missing)} are not in this fit's symbol")
    if extra:
        parts.append(f"this fit's {', '.join(extra)} are not in the checkpoint")
    if reshaped:
        parts.append("shapes differ: " + "; ".join(reshaped))
    return "the symbol's params differ (" + "; ".join(parts) + ")" if parts else None
