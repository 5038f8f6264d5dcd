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
    "host_views",
    "param_stypes",
    "update_per_parameter",
    "updater",
    "wait_for_engine",
]


def param_stypes(mod: mx.mod.Module) -> dict[str, tuple[str, str | None]]:
    """Each parameter's storage type and its gradient's (None without one), as bound."""
    group = mod._exec_group
    grads = group.grad_arrays or [[None]] * len(group.param_names)
    return {
        name: (a[0].stype, g[0].stype if g[0] is not None else None)
        for name, a, g in zip(group.param_names, group.param_arrays, grads)
    }


def host_views(arrays: list) -> list[np.ndarray]:
    """Writable numpy arrays over dense CPU NDArrays' own memory, once MXNet's engine has run
    every operation pushed so far (:func:`wait_for_engine`; MXNet's public ``asnumpy``
    copies; its DLPack export makes numpy arrays read-only). Valid while each array lives;
    MXNet's engine does not see writes through them, so nothing may be queued on the arrays
    meanwhile."""
    wait_for_engine()
    return [_view(a) for a in arrays]


def _view(array: mx.nd.NDArray) -> np.ndarray:
    """A numpy array over ``array``'s memory, whatever MXNet's engine still has queued on it."""
    if array.size == 0:
        return np.empty(array.shape, array.dtype)
    pointer = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(pointer)))
    dtype = np.dtype(array.dtype)
    memory = (ctypes.c_byte * (array.size * dtype.itemsize)).from_address(pointer.value)
    return np.frombuffer(memory, dtype).reshape(array.shape)


def wait_for_engine() -> None:
    """Waits until MXNet's engine has run every operation pushed so far in this process: one
    wait, about a microsecond when the engine is idle, where a wait for one array
    (``MXNDArrayWaitToWrite``) costs about 40 (a worker views and waits for some twenty
    arrays a step)."""
    mx.nd.waitall()


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
    (``tests/test_numerics.py``), and on CPU the update is faster (:func:`apply_update`, which
    with momentum does the kernel's arithmetic on the host: 0.64 ms an update of the MLP of
    ``jobs/benchmark.py`` against 2.36 ms grouped by 4, ``jobs/update_kernels.py``; native
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
    :func:`updates_by_element`. With momentum, the update is done here, on the host
    (:func:`_sgd_mom_on_host`); without, MXNet's engine runs the kernels: wait for the arrays
    before reading them.

    Each part goes through elementwise arithmetic with the bits of the kernel MXNet's SGD runs
    for a dense array (:func:`_sgd_mom_on_host`, :func:`_sgd_kernel`), so a part's elements
    get the bits the whole array's would (``tests/test_numerics.py``). The update only reads
    ``grad_arrays``, which may be the sums in a node's shared memory that other workers read too
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
    # SGD with momentum on the host: one numpy pass per term, no kernel call per array
    host = optimizer.momentum > 0 and all(state is not None for state in states)
    if host:
        wait_for_engine()  # nothing queued on the arrays numpy reads and writes
    offset = 0
    for index, weight, state in reversed(list(zip(indices, weights, states))):
        size = weight.size  # a call into MXNet each time
        arrays = (weight, grad_arrays[index][0], state)
        if host:
            arrays = tuple(_view(a).reshape(-1) for a in arrays)
        for lo, hi in [(offset, offset + size)] if parts is None else parts:
            start, stop = max(lo, offset) - offset, min(hi, offset + size) - offset
            if start >= stop:
                continue
            whole = start == 0 and stop == size
            part = [a if a is None or whole else a.reshape((-1,))[start:stop] for a in arrays]
            if host:
                _sgd_mom_on_host(optimizer, *part, *rates[index])
            else:
                _sgd_kernel(optimizer, *part[:2], *rates[index])
        offset += size
    mod._params_dirty = True


_HOST_CHUNK = 1 << 16  # elements updated at a time on the host: the terms' passes stay in cache


def _sgd_mom_on_host(optimizer, weight, grad, mom, lr: float, wd: float) -> None:
    """``sgd_mom_update``'s arithmetic (MXNet 1.9.1's ``SGDMomKernel``), to its bits, on flat
    numpy arrays: ``mom = momentum * mom - lr * wd * weight - lr * rescale_grad * grad`` (with
    a clip, ``lr * clip(rescale_grad * grad)``), each product in the arrays' dtype from left
    to right, then ``weight += mom``. The scalars are the float32 values MXNet's parser makes
    of them (:func:`_as_mxnet_reads`), which are not always numpy's rounding of the same
    number. A chunk at a time, through two small buffers: a temporary the size of a large
    weight costs more in page faults than the arithmetic. On CPU this takes about half the
    time of a kernel call per array, most of which is MXNet's cost of a call
    (``jobs/update_kernels.py``)."""
    cast = weight.dtype.type
    lr, wd, momentum, rescale = (
        cast(_as_mxnet_reads(x)) for x in (lr, wd, optimizer.momentum, optimizer.rescale_grad)
    )
    # SGD passes a clip when it has one; the kernel clips when it is not negative
    bound = cast(_as_mxnet_reads(optimizer.clip_gradient)) if optimizer.clip_gradient else -1
    lr_rescale, lr_wd = lr * rescale, lr * wd
    size = weight.size
    step_buffer, decay_buffer = (np.empty(min(size, _HOST_CHUNK), weight.dtype) for _ in "ab")
    for lo in range(0, size, _HOST_CHUNK):
        hi = min(lo + _HOST_CHUNK, size)
        w, g, m = weight[lo:hi], grad[lo:hi], mom[lo:hi]
        step, decay = step_buffer[: hi - lo], decay_buffer[: hi - lo]
        if bound >= 0:
            np.multiply(g, rescale, out=step)
            np.clip(step, -bound, bound, out=step)
            step *= lr
        else:
            np.multiply(g, lr_rescale, out=step)
        m *= momentum
        np.multiply(w, lr_wd, out=decay)
        m -= decay
        m -= step
        w += m


_READS: dict[str, np.float32] = {}  # str(value) -> the float32 MXNet's parser makes of it


def _as_mxnet_reads(value: float) -> np.float32:
    """The float32 that MXNet makes of ``value`` passed to an operator as a ``float``
    parameter (as ``str(value)``, parsed by dmlc's own parser, which does not always round as
    numpy does): read back through ``sgd_mom_update`` itself, once per value."""
    key = str(value)
    if key not in _READS:
        if len(_READS) > 1024:  # a learning rate scheduled step by step: new values each step
            _READS.clear()
        weight, grad, mom = mx.nd.zeros((1,)), mx.nd.ones((1,)), mx.nd.zeros((1,))
        # mom = 0 * mom - value * 0 * weight - value * 1 * grad = -value, as parsed
        mx.nd.sgd_mom_update(weight, grad, mom, out=weight, lr=value, wd=0.0, momentum=0.0)
        _READS[key] = np.float32(-mom.asnumpy()[0])
    return _READS[key]


def _sgd_kernel(optimizer, weight, grad, lr: float, wd: float) -> None:
    """``SGD._update_impl``'s update of one dense array without momentum (MXNet 1.9.1), to its
    bits: MXNet's own ``multi_sgd_update``, which it runs even for one array (``sgd_update``
    rounds the weight decay differently). A negative momentum has a state, which MXNet leaves
    alone: it updates as without momentum. With momentum, see :func:`_sgd_mom_on_host`."""
    kwargs = {"rescale_grad": optimizer.rescale_grad}
    if optimizer.clip_gradient:
        kwargs["clip_gradient"] = optimizer.clip_gradient
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
