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
    check_call(_LIB.MXNDArrayWaitToWrite(array.handle))
    if array.size == 0:
        return np.empty(array.shape, array.dtype)
    pointer = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(pointer)))
    dtype = np.dtype(array.dtype)
    memory = (ctypes.c_byte * (array.size * dtype.itemsize)).from_address(pointer.value)
    return np.frombuffer(memory, dtype).reshape(array.shape)


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
    """Makes a CPU replica's plain SGD update each parameter with its own ``sgd_mom_update``
    rather than MXNet's multi-tensor ``multi_sgd_mom_update`` over groups of
    ``MXNET_OPTIMIZER_AGGREGATION_SIZE`` (4 by default): the results are the same to the bit
    (``tests/test_numerics.py``), and on CPU the update is faster. Measured on the MLP of
    ``jobs/benchmark.py``: 1.1 ms a step against 1.5-1.7 ms, and native MXNet trained 12 %
    faster with the variable set to 1. A ``MXNET_OPTIMIZER_AGGREGATION_SIZE`` the user set is
    left as it is, as are other optimizers (LARS and LAMB aggregate with other kernels) and
    other devices (on GPU, fewer kernel launches win)."""
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
    does with a kvstore of none, and marks the parameters changed on the device."""
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


def executor_arrays(mod: mx.mod.Module, which: str):
    """The executor's ``arg_dict``, ``grad_dict``, ``aux_dict`` or ``outputs``."""
    return getattr(mod._exec_group.execs[0], which)


def exec_group_facts(mod: mx.mod.Module) -> dict:
    """What MXNet's executor group says of itself beyond its arrays."""
    group = mod._exec_group
    return {"grad_req": dict(group.grad_req), "total_exec_bytes": group._total_exec_bytes}
