"""Read-only views of the private state MXNet's ``Module`` keeps and user code reaches into:
``_exec_group`` (one executor per worker), ``_updater`` and ``_kvstore``.

They mirror MXNet's shapes: ``mod._exec_group.execs[i].grad_dict`` is worker *i*'s gradients
(after ``update``, its own where its plain-SGD update read the sums in the node's shared
memory, as MXNet's multi-device module, updating on its kvstore, leaves them; else the sums),
``mod._exec_group.param_arrays[j][i]`` its copy of parameter *j*, ``mod._updater.states`` the
optimizer's states keyed as MXNet's ``Module`` keys them. Every access asks the workers (after
the calls already sent) and returns copies; the state lives on the workers, so writing through
a view is refused in words: change it with ``set_params``, ``set_states``, ``init_optimizer``
or ``load_optimizer_states``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import mxnet as mx
import numpy as np

from .data import to_ndarray

if TYPE_CHECKING:
    from .module import Module

__all__ = ["ExecGroupView", "ExecutorView", "KVStoreView", "Placed", "UpdaterView", "on_client"]


def on_client(where: tuple[str, int]) -> mx.Context:
    """The context the client holds an array on that a worker holds on ``where`` (device
    type, id): the same ``cpu(i)`` (the client can hold any), ``cpu(0)`` for a GPU's."""
    device_type, device_id = where
    return mx.Context(device_type, device_id) if device_type == "cpu" else mx.cpu()


@dataclass(frozen=True)
class Placed:
    """An array a worker holds, as the worker sends it: its values, where it lives (device
    type, id) and its storage type."""

    values: np.ndarray
    where: tuple[str, int]
    stype: str

    @classmethod
    def of(cls, array: mx.nd.NDArray | None) -> Placed | None:
        if array is None:
            return None
        where = (array.context.device_type, array.context.device_id)
        return cls(array.asnumpy(), where, array.stype)

    def on_client(self, context: mx.Context | None = None) -> mx.nd.NDArray:
        """A copy on ``context``, or where the client holds what the worker holds."""
        nd = to_ndarray(self.values, context or on_client(self.where))
        return nd if self.stype == "default" else nd.tostype(self.stype)


def _on_client(value, context: mx.Context | None = None):
    """A worker's answer with every :class:`Placed` in it an NDArray on the client."""
    if isinstance(value, Placed):
        return value.on_client(context)
    if isinstance(value, (tuple, list)):
        return type(value)(_on_client(v, context) for v in value)
    return value


class _ReadOnly:
    """Refuses every write, saying where the state lives and how to change it."""

    _how = "set_params(), set_states() or init_optimizer()"

    def __setattr__(self, name, value):
        self.__delattr__(name)

    def __delattr__(self, name):
        raise AttributeError(
            f"{type(self).__name__}.{name} is read-only: raymodule's workers hold this state "
            f"and the view shows copies; change it with the module's {self._how}"
        )


class ExecutorView(_ReadOnly):
    """Worker ``rank``'s executor: ``arg_dict``, ``grad_dict``, ``aux_dict``, ``outputs`` and
    the ``*_arrays`` lists, on the context the worker computed them on."""

    def __init__(self, module: Module, rank: int):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_rank", rank)

    def _read(self, which: str):
        module = self._module
        module._workers.sync()
        return module._workers.call("executor", module._id, which, ranks=[self._rank])[0]

    def _dict(self, which: str) -> MappingProxyType:
        return MappingProxyType({k: _on_client(v) for k, v in self._read(which).items()})

    @property
    def arg_dict(self) -> MappingProxyType:
        return self._dict("arg_dict")

    @property
    def grad_dict(self) -> MappingProxyType:
        return self._dict("grad_dict")

    @property
    def aux_dict(self) -> MappingProxyType:
        return self._dict("aux_dict")

    @property
    def outputs(self) -> list:
        return _on_client(self._read("outputs"))

    @property
    def arg_arrays(self) -> list:
        return list(self.arg_dict.values())

    @property
    def grad_arrays(self) -> list:
        return list(self.grad_dict.values())

    @property
    def aux_arrays(self) -> list:
        return list(self.aux_dict.values())


class ExecGroupView(_ReadOnly):
    """MXNet's ``DataParallelExecutorGroup`` of a bound module: one executor per worker."""

    def __init__(self, module: Module):
        object.__setattr__(self, "_module", module)

    @property
    def execs(self) -> list[ExecutorView]:
        return [ExecutorView(self._module, rank) for rank in range(self._module.world_size)]

    def _per_param(self, which: str, names: list[str]) -> list[list]:
        """MXNet's layout: one list per parameter, holding each worker's array of it."""
        per_worker = [getattr(e, which) for e in self.execs]
        return [[arrays[name] for arrays in per_worker] for name in names]

    @property
    def param_arrays(self) -> list[list]:
        return self._per_param("arg_dict", self.param_names)

    @property
    def grad_arrays(self) -> list[list]:
        return self._per_param("grad_dict", self.param_names)

    @property
    def aux_arrays(self) -> list[list]:
        return self._per_param("aux_dict", self.aux_names)

    @property
    def param_names(self) -> list[str]:
        return list(self._module._param_names)

    @property
    def arg_names(self) -> list[str]:
        return self._module.symbol.list_arguments()

    @property
    def aux_names(self) -> list[str]:
        return list(self._module._aux_names)

    @property
    def contexts(self) -> list[mx.Context]:
        return list(self._module._context)

    @property
    def slices(self) -> list[slice]:
        return list(self._module._slices)

    @property
    def batch_size(self) -> int:
        return sum(s.stop - s.start for s in self._module._slices)

    @property
    def data_shapes(self) -> list:
        return self._module.data_shapes

    @property
    def label_shapes(self) -> list | None:
        return self._module.label_shapes

    @property
    def for_training(self) -> bool:
        return self._module.for_training

    @property
    def inputs_need_grad(self) -> bool:
        return self._module.inputs_need_grad

    @property
    def grad_req(self) -> dict[str, str]:
        """Each argument's gradient request, as MXNet resolved it (fixed parameters and
        inputs ``null`` unless asked for)."""
        module = self._module
        return module._workers.call("exec_group", module._id, ranks=[0])[0]["grad_req"]

    @property
    def _total_exec_bytes(self) -> int:
        return self._module._total_exec_bytes


class UpdaterView(_ReadOnly):
    """The optimizer every worker runs (MXNet's ``Updater``): ``states`` from worker 0 (every
    replica holds the same), keyed as MXNet's ``Module`` keys them when it updates itself:
    parameter *i*'s state on device *k* under ``i * len(context) + k``."""

    _how = "init_optimizer() or load_optimizer_states()"

    def __init__(self, module: Module):
        object.__setattr__(self, "_module", module)

    @property
    def optimizer(self) -> mx.optimizer.Optimizer:
        return self._module._optimizer

    @property
    def states(self) -> dict:
        module = self._module
        module._workers.sync()
        by_index = module._workers.call("updater_states", module._id, ranks=[0])[0]
        contexts = [on_client((c.device_type, c.device_id)) for c in module._context]
        return {
            index * len(contexts) + k: _on_client(state, context)
            for index, state in by_index.items()
            for k, context in enumerate(contexts)
        }

    def get_states(self, dump_optimizer: bool = False) -> bytes:
        """MXNet's ``Updater.get_states`` of worker 0's updater (what
        ``save_optimizer_states`` writes)."""
        module = self._module
        module._workers.sync()
        if dump_optimizer:
            raise ValueError(
                "get_states(dump_optimizer=True): the optimizer is the module's "
                "(mod._optimizer); raymodule dumps the states only"
            )
        return module._workers.call("optimizer_states", module._id, ranks=[0])[0]


class KVStoreView(_ReadOnly):
    """The kvstore MXNet would create for the name given (its ``type``). raymodule sums
    gradients with its own allreduce and updates on every worker, so there is no store to
    push to or pull from; the client feeds the whole global batch, as one MXNet process with
    several devices does: ``rank`` 0 of ``num_workers`` 1."""

    _how = "init_optimizer(kvstore=...)"

    def __init__(self, type_: str):
        object.__setattr__(self, "type", type_)
        object.__setattr__(self, "rank", 0)
        object.__setattr__(self, "num_workers", 1)

    def __repr__(self) -> str:
        return f"KVStoreView(type={self.type!r})"
