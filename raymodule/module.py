"""``raymodule.Module``: MXNet 1.9.1's ``mx.mod.Module`` API, computed by Ray worker actors.

The facade keeps what MXNet keeps on the host (names, shapes, the parameters' host copy) and
sends the rest to one worker per context. A global batch is split by ``work_load_list`` as
MXNet splits it across devices (``"auto"``: by weights the controller adjusts to each worker's
measured compute speed); gradients are summed across workers as the KVStore sums them.
"""

from __future__ import annotations

import itertools
import logging
import warnings

import mxnet as mx
import ray
from mxnet import context as ctx
from mxnet import optimizer as opt
from mxnet.base import MXNetError
from mxnet.initializer import Uniform
from mxnet.io import DataDesc
from mxnet.module.base_module import BaseModule, _check_input_names, _parse_data_desc
from mxnet.module.executor_group import _prepare_group2ctxs
from mxnet.ndarray.sparse import row_sparse_array

from . import data, loop, metrics, params, storage, views
from .checkpoint import continuity
from .context import floor_of
from .errors import CallOrderError, first_line
from .handle import ControllerHandle
from .kvstore import SUPPORTED_KVSTORES, check_kvstore

__all__ = ["Module", "SUPPORTED_KVSTORES"]

_DEFAULT_LABEL_NAMES = ("softmax_label",)
_module_ids = itertools.count()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CallOrderError(message)


def _check_optimizer_name(name: str) -> None:
    if name.lower() not in opt.Optimizer.opt_registry:
        known = ", ".join(sorted(opt.Optimizer.opt_registry))
        raise ValueError(f"optimizer={name!r} is not a registered MXNet optimizer; known: {known}")


def _load_ndarrays(location: str) -> dict:
    return mx.nd.load_frombuffer(storage.read_bytes(location))


def _batch_shapes(data_batch) -> tuple[list[tuple], list[tuple]]:
    """The shapes of a batch's data and label arrays; of its ``provide_data`` and
    ``provide_label`` when it carries none (a dataset's batch, read on the workers) or reads
    them only when asked (an NDArrayIter's, read as rows: asking would read them)."""
    if getattr(data_batch, "reads_on_demand", False) or data_batch.data is None:
        return (
            [tuple(d.shape) for d in data_batch.provide_data],
            [tuple(d.shape) for d in data_batch.provide_label or []],
        )
    return [tuple(a.shape) for a in data_batch.data], [
        tuple(a.shape) for a in data_batch.label or []
    ]


def _np(params: dict) -> dict:
    return {k: v.asnumpy() for k, v in params.items()}


class Module(loop.TrainingLoops, BaseModule):
    """``mx.mod.Module`` on Ray: one worker actor per entry of ``context``.

    Parameters are MXNet's, in MXNet's order. ``context`` entries name the workers' devices:
    ``mx.cpu(i)`` is a worker reserving one CPU, ``mx.gpu(i)`` one reserving one GPU, and
    :func:`raymodule.workers` builds contexts that reserve more. ``compression_params`` is not
    supported and raises. Call :meth:`close` (or use ``with``) to release the workers early;
    they are released anyway when the module is garbage-collected.
    """

    # fit/score over a raymodule.data.DatasetIter send the workers indices, not samples
    _reads_datasets = True

    def __init__(
        self,
        symbol,
        data_names=("data",),
        label_names=_DEFAULT_LABEL_NAMES,
        logger=logging,
        context=ctx.cpu(),
        work_load_list=None,
        fixed_param_names=None,
        state_names=None,
        group2ctxs=None,
        compression_params=None,
    ):
        super().__init__(logger=logger)
        if isinstance(context, ctx.Context):
            context = [context]
        context = list(context)
        if not context or not all(isinstance(c, ctx.Context) for c in context):
            raise ValueError(f"context={context!r}: expected an mx.Context or a non-empty list")
        self._context = context
        if isinstance(work_load_list, str) and work_load_list != "auto":
            raise ValueError(f"work_load_list={work_load_list!r}: a list of weights, or 'auto'")
        self._balance_work = isinstance(work_load_list, str)  # "auto", checked above
        if work_load_list is None or self._balance_work:
            work_load_list = [1] * len(context)
        work_load_list = list(work_load_list)
        if len(work_load_list) != len(context):
            raise ValueError(
                f"work_load_list={work_load_list} has {len(work_load_list)} entries; "
                f"expected one per context ({len(context)})"
            )
        if not all(isinstance(w, (int, float)) and w > 0 for w in work_load_list):
            raise ValueError(f"work_load_list={work_load_list}: every weight must be a number > 0")
        self._work_load_list = work_load_list
        if compression_params is not None:
            raise NotImplementedError(
                f"compression_params={compression_params!r}: gradient compression is not "
                "supported by raymodule's allreduce; gradients are summed exactly"
            )
        self._compression_params = None
        self._group2ctxs = group2ctxs
        self._worker_group2ctxs = _prepare_group2ctxs(group2ctxs, len(context))
        self._symbol = symbol
        self._symbol_files: dict[bool, bytes] = {}

        data_names = list(data_names) if data_names is not None else []
        label_names = list(label_names) if label_names is not None else []
        state_names = list(state_names) if state_names is not None else []
        fixed_param_names = list(fixed_param_names) if fixed_param_names is not None else []
        _check_input_names(symbol, data_names, "data", True)
        # MXNet only warns about label names; raise when they were given explicitly.
        explicit_labels = label_names != list(_DEFAULT_LABEL_NAMES)
        _check_input_names(symbol, label_names, "label", explicit_labels)
        _check_input_names(symbol, state_names, "state", True)
        _check_input_names(symbol, fixed_param_names, "fixed_param", True)

        arg_names = symbol.list_arguments()
        input_names = data_names + label_names + state_names
        self._param_names = [x for x in arg_names if x not in input_names]
        self._fixed_param_names = fixed_param_names
        self._aux_names = symbol.list_auxiliary_states()
        self._data_names = data_names
        self._label_names = label_names
        self._state_names = state_names
        self._output_names = symbol.list_outputs()
        self._output_axes = [
            DataDesc.get_batch_axis(symbol[i].attr("__layout__"))
            for i in range(len(self._output_names))
        ]

        self._arg_params = None
        self._aux_params = None
        self._dirty = False
        self._optimizer = None
        self._kvstore_type: str | None = None  # the kvstore MXNet would create, if any
        self._update_on_kvstore = None
        self._preload_opt_states = None
        self._grad_req = None
        self._data_shapes = None
        self._label_shapes = None
        self._monitor = None
        self._array_contexts = (0, None)  # (generation, where each worker's arrays live)

        self._shared_module: Module | None = None  # bound with shared_module=
        self._borrowed_from: Module | None = None  # borrow_optimizer(...)
        self._id = next(_module_ids)
        self._workers: ControllerHandle | None = None
        self._owns_workers = False

    @property
    def _params_dirty(self) -> bool:
        """Whether the workers' parameters are newer than the host copy. Modules sharing
        workers share parameters, so an update through any of them makes all of them dirty."""
        return self._workers.params_dirty if self._workers is not None else self._dirty

    @_params_dirty.setter
    def _params_dirty(self, value: bool) -> None:
        if self._workers is not None:
            self._workers.params_dirty = value
        else:
            self._dirty = value

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Releases the workers (a module sharing them releases only its own replicas)."""
        if self._workers is None:
            return
        if self._owns_workers:
            self._workers.close()
        elif self._workers.live:  # lost: nothing to drop, the owner's close releases them
            self._workers.post("drop", self._id)
        self._workers = None
        self._reset_bind()

    def __enter__(self) -> Module:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def load(prefix, epoch, load_optimizer_states=False, **kwargs):
        """Creates a module from an MXNet checkpoint (``prefix-symbol.json``,
        ``prefix-%04d.params`` and, when asked, ``prefix-%04d.states``); ``prefix`` may be a
        local path or a URI."""
        symbol = mx.sym.load_json(
            storage.read_bytes(storage.with_suffix(prefix, "-symbol.json")).decode()
        )
        args, auxs = data.split_params(
            _load_ndarrays(storage.with_suffix(prefix, "-%04d.params" % epoch))
        )
        mod = Module(symbol=symbol, **kwargs)
        mod._arg_params = args
        mod._aux_params = auxs
        mod.params_initialized = True
        if load_optimizer_states:
            mod._preload_opt_states = storage.with_suffix(prefix, "-%04d.states" % epoch)
        return mod

    def save_checkpoint(self, prefix, epoch, save_optimizer_states=False, remove_amp_cast=True):
        """Saves ``prefix-symbol.json``, ``prefix-%04d.params`` and optionally the optimizer
        states, as MXNet does; ``prefix`` may be a local path or a URI."""
        storage.write_bytes(
            storage.with_suffix(prefix, "-symbol.json"), self._symbol_file(remove_amp_cast)
        )
        param_name = storage.with_suffix(prefix, "-%04d.params" % epoch)
        self.save_params(param_name)
        logging.info('Saved checkpoint to "%s"', storage.redact(param_name))
        if save_optimizer_states:
            state_name = storage.with_suffix(prefix, "-%04d.states" % epoch)
            self.save_optimizer_states(state_name)
            logging.info('Saved optimizer state to "%s"', storage.redact(state_name))

    def save_params(self, fname):
        """Saves the parameters in MXNet's ``.params`` format to a local path or URI."""
        arg_params, aux_params = self.get_params()
        save_dict = {f"arg:{k}": v.as_in_context(mx.cpu()) for k, v in arg_params.items()}
        save_dict.update({f"aux:{k}": v.as_in_context(mx.cpu()) for k, v in aux_params.items()})
        storage.write_bytes(fname, data.nd_bytes(save_dict))

    def load_params(self, fname):
        """Loads parameters saved by ``save_params`` (or MXNet's) from a local path or URI."""
        arg_params, aux_params = data.split_params(_load_ndarrays(fname))
        self.set_params(arg_params, aux_params)

    def _reset_bind(self):
        self.binded = False
        self._array_contexts = (0, None)
        self._data_shapes = None
        self._label_shapes = None

    # -- names and shapes ------------------------------------------------------------------------
    @property
    def data_names(self):
        return self._data_names

    @property
    def label_names(self):
        return self._label_names

    @property
    def output_names(self):
        return self._output_names

    @property
    def data_shapes(self):
        _require(self.binded, "data_shapes: call bind() first")
        return self._data_shapes

    @property
    def label_shapes(self):
        _require(self.binded, "label_shapes: call bind() first")
        return self._label_shapes

    @property
    def output_shapes(self):
        _require(self.binded, "output_shapes: call bind() first")
        shapes = {d.name: d.shape for d in self._data_shapes + (self._label_shapes or [])}
        _, out_shapes, _ = self._symbol.infer_shape_partial(**shapes)
        # MXNet's rule (DataParallelExecutorGroup.get_output_shapes): an output's batch axis
        # reads the batch size, even where the output has more rows (a flattened sequence)
        batch_size = sum(s.stop - s.start for s in self._slices)
        return [
            (name, tuple(batch_size if i == axis else n for i, n in enumerate(shape)))
            for name, shape, axis in zip(self._output_names, out_shapes, self._output_axes)
        ]

    @property
    def world_size(self) -> int:
        """Workers training now: the contexts given, fewer while an elastic run has lost some."""
        if self._workers is None or self._workers.closed:
            return len(self._context)
        return self._workers.world_size

    @property
    def workers(self) -> ControllerHandle | None:
        """The worker actors of this module (``None`` before ``bind``)."""
        return self._workers

    def _infer(self, data_shapes, label_shapes):
        """Parameter, aux and output shapes for global input shapes, or a ValueError in words."""
        inputs = {d.name: d.shape for d in data_shapes + (label_shapes or [])}
        try:
            arg_shapes, out_shapes, aux_shapes = self._symbol.infer_shape(**inputs)
            arg_types, _, aux_types = self._symbol.infer_type(
                **{d.name: d.dtype for d in data_shapes + (label_shapes or [])}
            )
        except MXNetError as err:
            detail = first_line(err)
            raise ValueError(f"input shapes {inputs} do not fit the symbol: {detail}") from None
        if arg_shapes is None:
            raise ValueError(f"input shapes {inputs} are not enough to infer every shape")
        names = self._symbol.list_arguments()
        params = {
            n: (s, t) for n, s, t in zip(names, arg_shapes, arg_types) if n in self._param_names
        }
        aux = dict(zip(self._aux_names, zip(aux_shapes, aux_types)))
        return params, aux

    def _check_param_shapes(self, params, aux, holder: Module | None = None) -> None:
        """Checks inferred parameter shapes against those ``holder`` holds: this module's own
        (only the batch size may change) or those of the module it shares them with."""
        holder = holder or self
        if holder._arg_params is None:
            return
        whose, rule = (
            ("module's", "only the batch size may change")
            if holder is self
            else ("shared module's", "modules sharing parameters need the same parameter shapes")
        )
        for name, (shape, _) in itertools.chain(params.items(), aux.items()):
            held = holder._arg_params.get(name, holder._aux_params.get(name))
            if held is not None and tuple(held.shape) != tuple(shape):
                raise ValueError(
                    f"the input shapes need {name} of shape {tuple(shape)}, but the {whose} "
                    f"{name} has shape {tuple(held.shape)}; {rule}"
                )

    def _split(self, data_shapes, label_shapes):
        """Per-worker slices and shapes for global shapes, over the workers training now
        (the controller splits the same way)."""
        weights = self._work_load_list
        if self._workers is not None:
            weights = self._workers.work_load or weights  # "auto": the controller's now
            weights = self._workers.membership.weights(weights)
        return data.split_shapes(data_shapes, label_shapes, weights)

    @property
    def _slices(self) -> list[slice] | None:
        """Each worker's slice of a global batch of the bound shapes."""
        if self._data_shapes is None:
            return None
        return self._split(self._data_shapes, self._label_shapes)[0]

    # -- bind, parameters, optimizer ---------------------------------------------------------------
    def bind(
        self,
        data_shapes,
        label_shapes=None,
        for_training=True,
        inputs_need_grad=False,
        force_rebind=False,
        shared_module=None,
        grad_req="write",
    ):
        if force_rebind:
            if self.binded and self.params_initialized and self._params_dirty:
                self._sync_params_from_devices()  # the new executors start from the latest
            self._reset_bind()
        if self.binded:
            self.logger.warning("Already bound, ignoring bind()")
            return
        if not for_training and inputs_need_grad:
            raise ValueError("inputs_need_grad=True needs for_training=True")
        data_shapes, label_shapes = _parse_data_desc(
            self.data_names, self.label_names, data_shapes, label_shapes
        )
        params, aux = self._infer(data_shapes, label_shapes)
        self._check_param_shapes(params, aux)
        self._split(data_shapes, label_shapes)  # checks the batch sizes before workers start

        if shared_module is not None:
            if not isinstance(shared_module, Module):
                raise TypeError("shared_module must be a raymodule.Module")
            _require(
                shared_module.binded and shared_module.params_initialized,
                "shared_module must be bound with initialized parameters",
            )
            self._check_param_shapes(params, aux, holder=shared_module)
            if len(shared_module._context) != len(self._context):
                raise ValueError(
                    f"shared_module has {len(shared_module._context)} workers, this module "
                    f"{len(self._context)}; modules sharing workers need the same contexts"
                )
            self._attach(shared_module._workers, owns=False)
        elif self._workers is None:
            start_with = self._run_floor or floor_of(self._context)
            self._attach(ControllerHandle(self._context, start_with=start_with), owns=True)

        self.for_training = for_training
        self.inputs_need_grad = inputs_need_grad
        self._grad_req = grad_req
        self._shared_module = shared_module
        shared = shared_module._id if shared_module is not None else None
        stypes = self._workers.bind(
            self._id,
            (for_training, inputs_need_grad, shared, grad_req),
            (data_shapes, label_shapes),
            self._work_load_list,
            self._balance_work,
        )
        sparse = sorted(n for n, (_, grad) in stypes.items() if grad == "row_sparse")
        if sparse and len(self._context) > 1 and any(c.device_type == "gpu" for c in self._context):
            raise NotImplementedError(
                f"row_sparse gradients of {sparse} on GPU workers: raymodule gathers sparse rows "
                "with gloo on CPU workers only; use CPU contexts or dense gradients"
            )
        self._data_shapes, self._label_shapes = data_shapes, label_shapes

        if shared_module is not None:
            self.params_initialized = True
            self._arg_params = shared_module._arg_params
            self._aux_params = shared_module._aux_params
        elif self.params_initialized:
            self._push_params(allow_extra=False)
        else:
            # host copies of MXNet's storage types: a row_sparse weight's is row_sparse
            self._arg_params = {
                n: mx.nd.zeros(s, dtype=t, stype=stypes[n][0]) for n, (s, t) in params.items()
            }
            self._aux_params = {n: mx.nd.zeros(s, dtype=t) for n, (s, t) in aux.items()}
        if shared_module is not None and shared_module.optimizer_initialized:
            self.borrow_optimizer(shared_module)
        self.binded = True

    def _attach(self, workers: ControllerHandle, owns: bool) -> None:
        self._workers = workers
        self._owns_workers = owns
        workers.create(
            self._id,
            (
                self._symbol,
                self._data_names,
                self._label_names,
                self._fixed_param_names,
                self._state_names,
            ),
            [(self._worker_group2ctxs[slot], c.device_id) for slot, c in enumerate(self._context)],
        )

    def reshape(self, data_shapes, label_shapes=None):
        _require(self.binded, "reshape: call bind() first")
        data_shapes, label_shapes = _parse_data_desc(
            self.data_names, self.label_names, data_shapes, label_shapes
        )
        self._check_param_shapes(*self._infer(data_shapes, label_shapes))
        self._split(data_shapes, label_shapes)  # checks the batch sizes
        self._workers.reshape(self._id, (data_shapes, label_shapes))
        self._data_shapes, self._label_shapes = data_shapes, label_shapes

    def init_params(
        self,
        initializer=Uniform(0.01),
        arg_params=None,
        aux_params=None,
        allow_missing=False,
        force_init=False,
        allow_extra=False,
    ):
        """Initialises parameters on the client (its RNG, as MXNet does) and sends them."""
        if self.params_initialized and not force_init:
            warnings.warn(
                "Parameters already initialized and force_init=False. init_params call ignored.",
                stacklevel=2,
            )
            return
        _require(self.binded, "call bind before initializing the parameters")

        params.initialize(self._symbol, self._arg_params, arg_params, initializer, allow_missing)
        params.initialize(self._symbol, self._aux_params, aux_params, initializer, allow_missing)
        self.params_initialized = True
        self._params_dirty = False
        self._push_params(allow_extra=allow_extra)

    def _push_params(self, allow_extra: bool) -> None:
        arg, aux = ray.put(_np(self._arg_params)), ray.put(_np(self._aux_params))
        self._workers.post("set_params", self._id, arg, aux, False, allow_extra)

    def set_params(
        self, arg_params, aux_params, allow_missing=False, force_init=True, allow_extra=False
    ):
        if not allow_missing:
            self.init_params(
                initializer=None,
                arg_params=arg_params,
                aux_params=aux_params,
                allow_missing=allow_missing,
                force_init=force_init,
                allow_extra=allow_extra,
            )
            return
        if self.params_initialized and not force_init:
            warnings.warn(
                "Parameters already initialized and force_init=False. set_params call ignored.",
                stacklevel=2,
            )
            return
        _require(self.binded, "set_params: call bind() first")
        (arg, aux), error = params.copyable(
            self._arg_params,
            self._aux_params,
            arg_params,
            aux_params,
            self._symbol.list_arguments(),
            allow_extra,
        )
        self._workers.post("set_params", self._id, _np(arg), _np(aux), True, False)
        if error is not None:
            raise error  # as MXNet's executors, after copying the names before the bad one
        self._params_dirty = True
        self.params_initialized = True

    def get_params(self):
        _require(self.params_initialized, "get_params: parameters are not initialized")
        if self._params_dirty:
            self._sync_params_from_devices()
        return (self._arg_params, self._aux_params)

    def _sync_params_from_devices(self):
        """Copies the parameters of worker 0 (all replicas are identical) into the host copy."""
        arg, aux = self._workers.params(self._id)
        for held, fresh in ((self._arg_params, arg), (self._aux_params, aux)):
            for name, value in fresh.items():
                if name in held and held[name].stype == "default":
                    data.copy_into(held[name], value)
                elif name in held:  # row_sparse: every row, as the workers' weight holds
                    # them (MXNet's updates of a row_sparse weight require all its rows)
                    rows = mx.nd.arange(len(value), dtype="int64")
                    row_sparse_array((data.to_ndarray(value), rows), shape=value.shape).copyto(
                        held[name]
                    )
                else:
                    held[name] = data.to_ndarray(value)
        self._params_dirty = False

    def init_optimizer(
        self,
        kvstore="local",
        optimizer="sgd",
        optimizer_params=(("learning_rate", 0.01),),
        force_init=False,
    ):
        """Installs the optimizer on every worker.

        Every kvstore name selects the synchronous Ray allreduce. ``rescale_grad`` defaults to
        1/global batch (MXNet's value for one process with several devices); for ``dist*_sync``
        names MXNet would also divide by the number of workers, which would be wrong here.
        """
        _require(
            self.binded and self.params_initialized,
            "init_optimizer: call bind() and init_params() first",
        )
        if self.optimizer_initialized and not force_init:
            self.logger.warning("optimizer already initialized, ignoring...")
            return
        check_kvstore(kvstore)
        if self._params_dirty:
            self._sync_params_from_devices()
        rescale_grad = 1.0 / sum(s.stop - s.start for s in self._slices)
        # With one device per worker, MXNet's optimizer index i names the i-th parameter.
        idx2name = dict(enumerate(self._param_names))
        if isinstance(optimizer, str):
            _check_optimizer_name(optimizer)
            optimizer_params = dict(optimizer_params)
            optimizer_params.setdefault("rescale_grad", rescale_grad)
            optimizer = opt.create(
                optimizer, sym=self.symbol, param_idx2name=idx2name, **optimizer_params
            )
        elif isinstance(optimizer, opt.Optimizer):
            if optimizer.rescale_grad != rescale_grad:
                warnings.warn(
                    "Optimizer created manually outside Module but rescale_grad is not "
                    f"normalized to 1.0/global batch size ({optimizer.rescale_grad} vs. "
                    f"{rescale_grad}). Is this intended?",
                    stacklevel=2,
                )
            if not optimizer.idx2name:
                optimizer.idx2name = idx2name.copy()
        else:
            raise ValueError(
                f"optimizer={optimizer!r}: expected a name or an mx.optimizer.Optimizer"
            )
        self._optimizer = optimizer
        self._borrowed_from = None
        # MXNet's _create_kvstore makes none for one device outside dist_*
        one_device = len(self._context) == 1 and "dist" not in (kvstore or "")
        self._kvstore_type = None if kvstore is None or one_device else kvstore
        self._update_on_kvstore = False  # every worker runs the update
        self._workers.post("init_optimizer", self._id, optimizer, {}, force_init)
        self.optimizer_initialized = True
        if self._preload_opt_states is not None:
            self.load_optimizer_states(self._preload_opt_states)
            self._preload_opt_states = None

    def borrow_optimizer(self, shared_module):
        """Uses ``shared_module``'s optimizer. A module not bound yet borrows it on the workers
        when it is bound with ``shared_module`` (as a bucketing module's buckets are)."""
        _require(
            shared_module.optimizer_initialized,
            "borrow_optimizer: the shared module has no optimizer",
        )
        if self._workers is not None and shared_module._workers is not self._workers:
            raise ValueError(
                "borrow_optimizer: the modules must share workers (bind with shared_module=...)"
            )
        self._optimizer = shared_module._optimizer
        self._borrowed_from = shared_module
        self._kvstore_type = shared_module._kvstore_type
        self._update_on_kvstore = False
        if self._workers is not None:
            self._workers.post("borrow_optimizer", self._id, shared_module._id)
        self.optimizer_initialized = True

    # -- MXNet's private state, as read-only views (raymodule.views) -----------------------------
    @property
    def _exec_group(self) -> views.ExecGroupView | None:
        """MXNet's executor group: ``execs[i]`` is worker *i*'s executor."""
        return views.ExecGroupView(self) if self.binded else None

    @property
    def _updater(self) -> views.UpdaterView | None:
        return views.UpdaterView(self) if self.optimizer_initialized else None

    @property
    def _kvstore(self) -> views.KVStoreView | None:
        if not self.optimizer_initialized or self._kvstore_type is None:
            return None
        return views.KVStoreView(self._kvstore_type)

    @property
    def _total_exec_bytes(self) -> int:
        """MXNet's count of the memory the executors allocated (in MB, as MXNet counts it),
        summed over the workers."""
        if not self.binded or self._workers is None:
            return 0
        self._workers.sync()
        return sum(g["total_exec_bytes"] for g in self._workers.call("exec_group", self._id))

    @_total_exec_bytes.setter
    def _total_exec_bytes(self, value: int) -> None:
        # BaseModule.__init__ sets 0, the count of a module not bound; it is not stored
        if value != 0:
            raise AttributeError("_total_exec_bytes is read-only: the workers' executors count it")

    # -- computation -------------------------------------------------------------------------
    def _step_module(self, data_batch, flush) -> Module:
        """The module that runs ``data_batch`` in the step loop: this one, reshaped to the
        batch if needed (after ``flush()``: queued batches were split for the old shapes)."""
        if self._shapes_changed(data_batch):
            flush()
            self._reshape_for(data_batch)
        return self

    def _shapes_changed(self, data_batch) -> bool:
        if isinstance(data_batch, list):
            raise ValueError(
                "raymodule takes one global DataBatch per call, not a list "
                "of per-device batches; the split across workers is automatic"
            )
        shapes = tuple(_batch_shapes(data_batch)[0])
        return shapes != tuple(tuple(d.shape) for d in self._data_shapes)

    def _reshape_for(self, data_batch) -> None:
        """Reshapes the module to the batch's shapes, as MXNet's ``forward`` does."""
        data_shapes, label_shapes = _batch_shapes(data_batch)
        if len(data_shapes) != len(self._data_shapes):
            raise ValueError(
                f"the batch has {len(data_shapes)} data arrays; the module "
                f"takes {len(self._data_shapes)} ({self._data_names})"
            )
        new_data = [
            DataDesc(d.name, shape, d.dtype, d.layout)
            for d, shape in zip(self._data_shapes, data_shapes)
        ]
        new_label = None
        if self._label_shapes and label_shapes:
            new_label = [
                DataDesc(d.name, shape, d.dtype, d.layout)
                for d, shape in zip(self._label_shapes, label_shapes)
            ]
        self.reshape(new_data, new_label)

    def _batch(self, data_batch) -> data.Batch:
        """The batch as numpy arrays (each worker receives its :meth:`data.Batch.parts`)."""
        return data.to_batch(data_batch, self._data_shapes, self._label_shapes)

    def forward(self, data_batch, is_train=None):
        _require(
            self.binded and self.params_initialized, "forward: call bind() and init_params() first"
        )
        if is_train is None:
            is_train = self.for_training
        if self._shapes_changed(data_batch):
            self._reshape_for(data_batch)
        parts = self._batch(data_batch).parts(self._slices)
        self._workers.post("forward", self._id, per_worker=[(ray.put(p), is_train) for p in parts])

    def backward(self, out_grads=None):
        _require(
            self.binded and self.params_initialized, "backward: call bind() and init_params() first"
        )
        per_worker = None
        if out_grads is not None:
            grads = [
                data.to_numpy(g)
                for g in (out_grads if isinstance(out_grads, (list, tuple)) else [out_grads])
            ]
            split = data.Batch(grads, [], self._output_axes, [])
            per_worker = [(split.worker_slice(s)[0],) for s in self._slices]
        self._workers.post(
            "backward", self._id, per_worker=per_worker or [(None,)] * len(self._slices)
        )

    def update(self):
        _require(
            self.binded and self.params_initialized and self.optimizer_initialized,
            "update: call bind(), init_params() and init_optimizer() first",
        )
        self._params_dirty = True
        self._workers.post("update", self._id)

    def _gather(self, method: str, axes: list[int], merge_multi_context: bool):
        """What ``method`` returns on every worker, as NDArrays on the contexts MXNet gives
        them: where the worker computed them for a ``cpu(i)`` (the client can hold any),
        ``cpu(0)`` for a GPU; merged ones on the first worker's, as MXNet merges."""
        self._workers.sync()
        return self._merge(method, self._workers.call(method, self._id), axes, merge_multi_context)

    def _merge(self, method: str, per_worker: list, axes: list[int], merge_multi_context: bool):
        """The arrays of ``method`` each worker returned (numpy), as :meth:`_gather` gives
        them."""
        generation, where_all = self._array_contexts
        if where_all is None or generation != self._workers.generation:
            where_all = self._workers.call("array_contexts", self._id)
            self._array_contexts = (self._workers.generation, where_all)
        contexts = [[views.on_client(w) for w in where[method]] for where in where_all]
        if merge_multi_context:
            return data.merge_outputs(per_worker, axes, contexts[0])
        return [
            [data.to_ndarray(arrays[i], on[i]) for arrays, on in zip(per_worker, contexts)]
            for i in range(len(axes))
        ]

    def get_outputs(self, merge_multi_context=True):
        _require(self.binded and self.params_initialized, "get_outputs: call bind() first")
        return self._gather("outputs", self._output_axes, merge_multi_context)

    def get_input_grads(self, merge_multi_context=True):
        _require(
            self.binded and self.params_initialized and self.inputs_need_grad,
            "get_input_grads: bind with inputs_need_grad=True first",
        )
        return self._gather("input_grads", data.batch_axes(self._data_shapes), merge_multi_context)

    def get_states(self, merge_multi_context=True):
        _require(self.binded and self.params_initialized, "get_states: call bind() first")
        return self._gather("get_states", [0] * len(self._state_names), merge_multi_context)

    def set_states(self, states=None, value=None):
        _require(self.binded and self.params_initialized, "set_states: call bind() first")
        if (states is None) == (value is None):
            raise ValueError("set_states: give exactly one of states and value")
        if states is None:
            self._workers.post("set_states", self._id, None, value)
            return
        per_worker = [
            ([data.to_numpy(s[rank]) for s in states], None) for rank in range(len(self._context))
        ]
        self._workers.post("set_states", self._id, per_worker=per_worker)

    def update_metric(self, eval_metric, labels, pre_sliced=False):
        self._workers.sync()
        outputs = self._workers.call("outputs", self._id)
        if pre_sliced:
            label_slices = [[data.to_numpy(x) for x in labels_i] for labels_i in labels]
        else:
            label_batch = data.Batch(
                [], [data.to_numpy(x) for x in labels], [], data.batch_axes(self._label_shapes)
            )
            label_slices = [label_batch.worker_slice(s)[1] for s in self._slices]
        metrics.update_per_slice(
            eval_metric, self._label_names, self._output_names, label_slices, outputs
        )

    def install_monitor(self, mon):
        """Installs a copy of ``mon`` on every worker; ``mon.tic()``/``mon.toc()`` then collect
        every worker's statistics, in worker order, as MXNet's do for every device."""
        _require(self.binded, "install_monitor: call bind() first")
        self._workers.post("install_monitor", self._id, mon)
        workers = self._workers

        def tic():
            workers.post("monitor_tic")

        def toc():
            workers.sync()
            rows = [row for rows in workers.call("monitor_toc") for row in rows]
            if mon.sort:  # as MXNet's: by name over every device's rows, devices in order
                rows.sort(key=lambda row: row[1])
            return rows

        mon.tic, mon.toc = tic, toc
        self._monitor = mon

    def prepare(self, data_batch, sparse_row_id_fn=None):
        _require(self.binded, "prepare: call bind() first")
        if sparse_row_id_fn is not None:
            warnings.warn(
                "Parameters are not updated in the KVStore. No need to call sparse_row_id_fn.",
                UserWarning,
                stacklevel=2,
            )

    # -- optimizer states ------------------------------------------------------------------------
    def save_optimizer_states(self, fname):
        """Writes the optimizer states (MXNet's ``.states`` format) from worker 0."""
        _require(self.optimizer_initialized, "save_optimizer_states: no optimizer installed")
        self._workers.sync()
        states = self._workers.call("optimizer_states", self._id, ranks=[0])[0]
        storage.write_bytes(fname, states)

    def load_optimizer_states(self, fname):
        """Reads an MXNet ``.states`` file (a pickle: only load files you trust)."""
        _require(self.optimizer_initialized, "load_optimizer_states: no optimizer installed")
        self._workers.post("set_optimizer_states", self._id, storage.read_bytes(fname))

    # -- training loops ----------------------------------------------------------------------------
    # -- what the fit loop and run checkpoints ask of a module ---------------------------------
    def _symbol_file(self, remove_amp_cast: bool) -> bytes:
        """``prefix-symbol.json``'s contents, made once (the symbol never changes): run
        checkpoints ask for it every ``checkpoint_every`` batches, from the training loop."""
        key = bool(remove_amp_cast)
        if key not in self._symbol_files:
            self._symbol_files[key] = self._symbol.tojson(remove_amp_cast=key).encode()
        return self._symbol_files[key]

    def _checkpoint_files(self) -> dict[str, bytes]:
        """The files of a run checkpoint that describe the model (besides its parameters)."""
        return {"model-symbol.json": self._symbol_file(True)}

    def _param_shapes(self) -> dict[str, list[int]]:
        """The bound symbol's parameters and their shapes, as a run checkpoint records them."""
        return continuity.param_shapes(self._arg_params, self._aux_params)

    @property
    def _snapshot_id(self) -> int:
        """The module whose replicas hold every parameter and the optimizer."""
        return self._id
