"""An MXNet optimizer's state as NDArrays plus JSON, so that resuming never unpickles.

MXNet's ``.states`` files are pickles of an ``Updater``'s states (and optionally of the whole
optimizer). A run checkpoint stores the same state without pickle: the state arrays in MXNet's
NDArray format (``optimizer.nd``) and, as JSON (``optimizer.json``), how they nest per
parameter, the parameter each belongs to, and the update counts. Hyperparameters and the
learning-rate scheduler's settings are recorded but not restored: the ``fit`` call that resumes
(or a Tune trial's new config) sets them, as it sets the optimizer itself. The schedule goes on
from the restored update count: MXNet calls the scheduler with it, and its own schedulers
(factor, multi-factor, poly, cosine) find their place from it alone, starting from the new
settings. A scheduler that keeps its place elsewhere starts again.

Runs where the optimizer is, in the worker processes.
"""

from __future__ import annotations

import json
import numbers

import mxnet as mx

from ..errors import ResumeMismatch

__all__ = ["capture", "restore", "plain_attributes"]


def plain_attributes(obj) -> dict:
    """The public attributes of ``obj`` that JSON holds exactly (numbers, strings, lists)."""
    out = {}
    for key, value in vars(obj).items():
        if key.startswith("_") or isinstance(value, (dict, set)):
            continue
        try:
            if json.loads(json.dumps(value)) == value:
                out[key] = value
        except (TypeError, ValueError):
            continue
    return out


def capture(updater: mx.optimizer.Updater) -> tuple[dict[str, mx.nd.NDArray], dict]:
    """The updater's state: named arrays for ``mx.nd.save`` and a JSON-ready description."""
    optimizer = updater.optimizer
    arrays: dict[str, mx.nd.NDArray] = {}

    def encode(index, key: str, state):
        if state is None:
            return None
        if isinstance(state, mx.nd.NDArray):
            arrays[key] = state.as_in_context(mx.cpu())
            return {"array": key}
        if isinstance(state, (tuple, list)):
            kind = "tuple" if isinstance(state, tuple) else "list"
            return {kind: [encode(index, f"{key}.{i}", s) for i, s in enumerate(state)]}
        if isinstance(state, (numbers.Number, str)):
            return {"value": state}
        raise TypeError(
            f"{type(optimizer).__name__} keeps a state of type {type(state).__name__} for "
            f"parameter {optimizer.idx2name.get(index, index)}, which a run checkpoint cannot store"
        )

    description = {
        "type": type(optimizer).__name__,
        "hyperparameters": plain_attributes(optimizer),
        "num_update": optimizer.num_update,
        "begin_num_update": optimizer.begin_num_update,
        "index_update_counts": [
            [device, sorted(counts.items())]
            for device, counts in optimizer._all_index_update_counts.items()
        ],
        "lr_scheduler": None,
        "states": [
            [index, encode(index, str(index), state)] for index, state in updater.states.items()
        ],
        "state_names": [[index, optimizer.idx2name.get(index)] for index in updater.states],
    }
    if optimizer.lr_scheduler is not None:
        description["lr_scheduler"] = {
            "type": type(optimizer.lr_scheduler).__name__,
            "attributes": plain_attributes(optimizer.lr_scheduler),
        }
    return arrays, description


def restore(
    updater: mx.optimizer.Updater, arrays: dict, description: dict, device_id: int | None = None
) -> None:
    """Puts a state captured by :func:`capture` into ``updater`` (whose optimizer was created
    by the resuming ``fit``); the arrays move to the weights' device at the next update.

    MXNet counts updates per device id. A worker's replica has one device, but its id is the
    module's context's (``cpu(i)``), which need not be the id of the replica the state was
    captured from: with ``device_id``, the captured counts become that device's, or the
    optimizer would count from the start again (a learning-rate schedule would restart)."""
    optimizer = updater.optimizer
    _check_names(optimizer, description)
    if type(optimizer).__name__ != description["type"]:
        raise ValueError(
            f"the checkpoint holds {description['type']} optimizer states, but the optimizer is "
            f"{type(optimizer).__name__}; resume with the optimizer the run was trained with"
        )
    scheduler = description["lr_scheduler"]
    if (scheduler is None) != (optimizer.lr_scheduler is None) or (
        scheduler is not None and scheduler["type"] != type(optimizer.lr_scheduler).__name__
    ):
        have = type(optimizer.lr_scheduler).__name__ if optimizer.lr_scheduler else "none"
        want = scheduler["type"] if scheduler else "none"
        raise ValueError(
            f"the checkpoint was trained with lr_scheduler {want}, the optimizer has {have}; "
            "resume with the same learning-rate schedule"
        )

    def decode(node):
        if node is None:
            return None
        if "array" in node:
            return arrays[node["array"]]
        if "value" in node:
            return node["value"]
        if "tuple" in node:
            return tuple(decode(n) for n in node["tuple"])
        return [decode(n) for n in node["list"]]

    updater.states = {index: decode(node) for index, node in description["states"]}
    updater.states_synced = dict.fromkeys(updater.states, False)
    optimizer.num_update = description["num_update"]
    optimizer.begin_num_update = description["begin_num_update"]
    counts = optimizer._all_index_update_counts
    current = next((d for d, c in counts.items() if c is optimizer._index_update_count), 0)
    captured = description["index_update_counts"]
    if device_id is not None and len(captured) == 1:
        captured, current = [(device_id, captured[0][1])], device_id
    optimizer._all_index_update_counts = {
        device: {index: count for index, count in counts} for device, counts in captured
    }
    optimizer._index_update_count = optimizer._all_index_update_counts.setdefault(current, {})


def _check_names(optimizer: mx.optimizer.Optimizer, description: dict) -> None:
    """Raises ``ResumeMismatch`` unless the states, which are restored by index, belong to the
    parameters of the same names in ``optimizer`` (when the checkpoint names them; else, at
    least to indices it has)."""
    names = optimizer.idx2name
    if not names:  # an optimizer that does not name its parameters (made by hand)
        return
    recorded = description.get("state_names")
    if recorded is None:  # a checkpoint from before the names: its indices must be ours
        wrong = [(i, "unnamed", None) for i, _ in description["states"] if i not in names]
    else:
        wrong = [(i, then, names.get(i)) for i, then in recorded if names.get(i) != then]
    if wrong:
        shown = "; ".join(f"#{i}: {then} in the checkpoint, {now} here" for i, then, now in wrong)
        raise ResumeMismatch(
            f"the checkpoint's optimizer states do not belong to this optimizer's parameters "
            f"(by index: {shown}): the symbol orders or names its parameters otherwise. Resume "
            "with the run's symbol, or start a new run: another RunConfig(name=...)"
        )
