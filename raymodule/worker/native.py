"""Every private of MXNet 1.9.1 a worker reaches into, in one place.

A replica is one ``mx.mod.Module`` bound to one device. Its public API has no way to read its
device arrays without copying them, to apply an update to gradients summed elsewhere, or to
read and replace its optimizer's state in place; these functions do, each over the private
it needs. An MXNet upgrade is checked here (and in :mod:`raymodule.checkpoint.optimizer_state`,
which reads and writes the updater's and optimizer's counters). Imported in worker processes
only: it imports MXNet.
"""

from __future__ import annotations

import ctypes
import os

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call

__all__ = [
    "apply_update",
    "apply_update_parts",
    "update_counts",
    "updated_arrays",
    "updates_by_element",
    "device_id",
    "device_params",
    "executor_arrays",
    "exec_group_facts",
    "gradient_arrays",
    "host_params",
    "host_view",
    "param_stypes",
    "update_per_parameter",
    "updater",
]


def param_stypes(mod: mx.mod.Module) -> dict[str, tuple[str, str | None]]:
    """Each parameter's storage type and its gradient's (None without one), as bound."""
    group = mod._exec_group
    grads = group.grad_arrays or [[None]] * len(group.param_names)
    return {
        name: (a[0].stype, g[0].stype if g[0] is not None else None)
        for name, a, g in zip(group.param_names, group.param_arrays, grads)
    }


def host_view(array: mx.nd.NDArray) -> np.ndarray:
    """A writable numpy array over a dense CPU NDArray's own memory, once MXNet's pending
    reads and writes of it are done (MXNet's public ``asnumpy`` copies; its DLPack export
    makes numpy arrays read-only). Valid while ``array`` lives; MXNet's engine does not see
    writes through it, so nothing may be queued on ``array`` meanwhile."""
    wait_to_write(array)
    if array.size == 0:
        return np.empty(array.shape, array.dtype)
    pointer = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(pointer)))
    dtype = np.dtype(array.dtype)
    memory = (ctypes.c_byte * (array.size * dtype.itemsize)).from_address(pointer.value)
    return np.frombuffer(memory, dtype).reshape(array.shape)


def wait_to_write(array: mx.nd.NDArray) -> None:
    """Waits until MXNet's engine has no read or write of ``array`` pending (MXNet's public
    ``wait_to_read`` waits for its writes only)."""
    check_call(_LIB.MXNDArrayWaitToWrite(array.handle))


def host_params(mod: mx.mod.Module) -> tuple[dict, dict]:
    """The parameters and auxiliary states as the device holds them, as numpy arrays by name:
    one copy each (MXNet's ``get_params`` makes four, averaging over devices a replica does
    not have), and a row_sparse weight's every row."""
    group = mod._exec_group
    return tuple(
        {name: arrays[0].asnumpy() for name, arrays in zip(names, held)}
        for names, held in (
            (group.param_names, group.param_arrays),
            (group.aux_names, group.aux_arrays),
        )
    )


def device_params(mod: mx.mod.Module) -> dict[str, mx.nd.NDArray]:
    """The device arrays themselves, ``arg:NAME`` and ``aux:NAME`` (MXNet's ``.params`` keys),
    without a copy: one device, nothing to average."""
    group = mod._exec_group
    params = {f"arg:{k}": a[0] for k, a in zip(group.param_names, group.param_arrays)}
    params.update({f"aux:{k}": a[0] for k, a in zip(group.aux_names, group.aux_arrays)})
    return params


def device_id(mod: mx.mod.Module) -> int:
    """The id of the device the replica is bound to."""
    return mod._context[0].device_id


def updater(mod: mx.mod.Module):
    """The module's updater (``mx.optimizer.Updater``): its ``states`` and optimizer."""
    return mod._updater


def update_per_parameter(mod: mx.mod.Module) -> None:
    """Makes a CPU replica's plain SGD update each parameter with its own kernel call rather
    than in groups of ``MXNET_OPTIMIZER_AGGREGATION_SIZE`` (4 by default) through one call of
    MXNet's multi-tensor ``multi_sgd_mom_update``: the results are the same to the bit
    (``tests/test_numerics.py``), and on CPU the update is faster (:func:`apply_update`, whose
    kernel with momentum is ``sgd_mom_update``: 1.05 ms an update of the MLP of
    ``jobs/benchmark.py`` against 1.97 ms grouped by 4, ``jobs/update_kernels.py``; native
    MXNet trained 12 % faster with the variable set to 1). A
    ``MXNET_OPTIMIZER_AGGREGATION_SIZE`` the user set is left as it is (MXNet's own update
    runs), as are other optimizers (LARS and LAMB aggregate with other kernels) and other
    devices (on GPU, fewer kernel launches win)."""
    optimizer = mod._optimizer
    if (
        "MXNET_OPTIMIZER_AGGREGATION_SIZE" in os.environ
        or type(optimizer) is not mx.optimizer.SGD
        or mod._context[0].device_type != "cpu"
    ):
        return
    optimizer.aggregate_num = 0
    mod._updater.aggregate_updates = False


def gradient_arrays(mod: mx.mod.Module) -> tuple[list, bool]:
    """The gradient arrays, one list per parameter (None without a gradient), and whether
    ``grad_req`` is ``add`` for any (its arrays then keep accumulating this worker's own)."""
    group = mod._exec_group
    return group.grad_arrays, "add" in group.grad_req.values()


def apply_update(mod: mx.mod.Module, grad_arrays: list) -> None:
    """Applies the optimizer to ``grad_arrays`` (summed over the workers), as ``update()``
    does with a kvstore of none, and marks the parameters changed on the device: plain SGD
    through :func:`apply_update_parts`, whole."""
    if updates_by_element(mod):
        apply_update_parts(mod, grad_arrays)
        return
    group = mod._exec_group
    mod._params_dirty = True
    mx.model._update_params(
        group.param_arrays,
        grad_arrays,
        updater=mod._updater,
        num_device=1,
        kvstore=None,
        param_names=group.param_names,
    )


def updates_by_element(mod: mx.mod.Module) -> bool:
    """Whether the update is plain SGD's on CPU with a kernel per parameter
    (:func:`update_per_parameter`), over dense weights and gradients of one dtype, neither
    float16 (its multi-precision state is not shaped like the weight) nor accumulated
    (``grad_req`` ``add``): an elementwise update, which :func:`apply_update_parts` may apply
    to parts of the parameters apart."""
    group = mod._exec_group
    if (
        type(mod._optimizer) is not mx.optimizer.SGD
        or mod._updater.aggregate_updates
        or mod._context[0].device_type != "cpu"
        or "add" in group.grad_req.values()
    ):
        return False
    pairs = [
        (w[0], g[0]) for w, g in zip(group.param_arrays, group.grad_arrays) if g[0] is not None
    ]
    dtypes = {np.dtype(a.dtype) for pair in pairs for a in pair}
    return (
        bool(pairs)
        and all(w.stype == g.stype == "default" for w, g in pairs)
        and len(dtypes) == 1
        and np.dtype(np.float16) not in dtypes
    )


def updated_arrays(mod: mx.mod.Module) -> tuple[list, list]:
    """The weights the update changes (those with a gradient, in parameter order) and the
    optimizer's state of each (None without one: SGD without momentum), made now where the
    updater has none yet, as its first update would."""
    group, updater = mod._exec_group, mod._updater
    weights, states = [], []
    for index, (w, g) in enumerate(zip(group.param_arrays, group.grad_arrays)):
        if g[0] is None:
            continue
        if index not in updater.states:
            updater.states[index] = mod._optimizer.create_state_multi_precision(index, w[0])
            updater.states_synced[index] = True
        elif not updater.states_synced[index]:
            updater.states[index] = updater.sync_state_context(updater.states[index], w[0].context)
            updater.states_synced[index] = True
        weights.append(w[0])
        states.append(updater.states[index])
    return weights, states


def update_counts(mod: mx.mod.Module) -> tuple[dict, int]:
    """The optimizer's update counters (per parameter, and ``num_update``), as they are."""
    optimizer = mod._optimizer
    optimizer._set_current_context(device_id(mod))
    return dict(optimizer._index_update_count), optimizer.num_update


def apply_update_parts(
    mod: mx.mod.Module, grad_arrays: list, parts: list[tuple[int, int]] | None = None, counts=None
) -> None:
    """Applies SGD to the elements in ``parts`` of the weights and their momentum (all of
    them without ``parts``), from ``grad_arrays`` (summed over the workers). A part is a range
    ``[lo, hi)`` of the flat concatenation of the gradients in reduction order (the last
    parameter's first, as :meth:`Collective.reduce` takes them). The counters count one
    update of every parameter, in parameter order, and each parameter gets the learning rate
    and weight decay the whole update gives it; with ``counts`` (:func:`update_counts` before
    the step) they are first set back to those: the same step's update of other parts. Needs
    :func:`updates_by_element`. MXNet's engine runs the kernels: wait for the arrays before
    reading them.

    Each part goes through an elementwise kernel with the bits of the one MXNet's SGD runs
    for a dense array (:func:`_sgd_update`), so a part's elements get the bits the whole
    array's would (``tests/test_numerics.py``). The kernels only read ``grad_arrays``, which
    may be the sums in a node's shared memory that other workers read too
    (``Collective.reduce_shared``): nothing here may write them."""
    optimizer = mod._optimizer
    optimizer._set_current_context(device_id(mod))
    if counts is not None:
        optimizer._index_update_count.clear()
        optimizer._index_update_count.update(counts[0])
        optimizer.num_update = counts[1]
    weights, states = updated_arrays(mod)
    indices = [i for i, g in enumerate(grad_arrays) if g[0] is not None]
    rates = {}
    for index in indices:  # as SGD._update_impl counts and rates each in its turn
        optimizer._update_count(index)
        rates[index] = optimizer._get_lrs([index])[0], optimizer._get_wds([index])[0]
    offset = 0
    for index, weight, state in reversed(list(zip(indices, weights, states))):
        grad, size = grad_arrays[index][0], weight.size  # size: a call into MXNet each time
        for lo, hi in [(offset, offset + size)] if parts is None else parts:
            start, stop = max(lo, offset) - offset, min(hi, offset + size) - offset
            if start >= stop:
                continue
            whole = start == 0 and stop == size
            arrays = [
                a if a is None or whole else a.reshape((-1,))[start:stop]
                for a in (weight, grad, state)
            ]
            _sgd_update(optimizer, *arrays, *rates[index])
        offset += size
    mod._params_dirty = True


def _sgd_update(optimizer, weight, grad, state, lr: float, wd: float) -> None:
    """``SGD._update_impl``'s update of one dense array (MXNet 1.9.1), to its bits. MXNet runs
    its multi-tensor kernel even for one array. With momentum, ``sgd_mom_update`` gives the
    same bits (``tests/test_numerics.py``) in about two thirds of the time on CPU (the MLP of
    ``jobs/benchmark.py``, ``jobs/update_kernels.py``: 1.05 ms an update against 1.62);
    without, ``sgd_update`` rounds the weight decay differently, so MXNet's own
    ``multi_sgd_update`` runs. A negative momentum has a state, which MXNet leaves alone: it
    updates as without momentum."""
    kwargs = {"rescale_grad": optimizer.rescale_grad}
    if optimizer.clip_gradient:
        kwargs["clip_gradient"] = optimizer.clip_gradient
    if state is not None and optimizer.momentum > 0:
        mx.nd.sgd_mom_update(
            weight, grad, state, out=weight, lr=lr, wd=wd, momentum=optimizer.momentum, **kwargs
        )
    else:
        mx.nd.multi_sgd_update(
            weight, grad, out=[weight], lrs=(lr,), wds=(wd,), num_weights=1, **kwargs
        )


def executor_arrays(mod: mx.mod.Module, which: str):
    """The executor's ``arg_dict``, ``grad_dict``, ``aux_dict`` or ``outputs``."""
    return getattr(mod._exec_group.execs[0], which)


def exec_group_facts(mod: mx.mod.Module) -> dict:
    """What MXNet's executor group says of itself beyond its arrays."""
    group = mod._exec_group
    return {"grad_req": dict(group.grad_req), "total_exec_bytes": group._total_exec_bytes}
