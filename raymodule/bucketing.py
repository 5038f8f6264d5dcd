"""``raymodule.BucketingModule``: MXNet 1.9.1's ``mx.mod.BucketingModule`` on Ray workers.

It is MXNet's own class with :class:`raymodule.Module` for the buckets: each bucket is a
module bound with ``shared_module`` = the default bucket's, so on every worker one native
module per bucket shares parameters and memory with the default one, exactly as MXNet's
buckets do on a device. A batch runs on the bucket its ``bucket_key`` names, on every worker
(the global batch is split by ``work_load_list``), so the allreduce covers the same
parameters in the same order everywhere; parameters a bucket does not use are neither reduced
nor updated in its steps.

Checkpoints hold MXNet's files (``prefix-KEY-symbol.json``, ``prefix-%04d.params``,
``prefix.buckets``) when every key is an int, so plain MXNet loads them; a JSON sidecar
(``prefix.buckets.json``) also names keys that are strings or tuples, and optimizer states are
saved when asked.
"""

from __future__ import annotations

import json
import logging
import warnings

import mxnet as mx
from mxnet import context as ctx
from mxnet.io import DataDesc
from mxnet.module.bucketing_module import BucketingModule as _MXNetBucketingModule

from . import data, loop, storage
from .errors import CallOrderError
from .module import Module

__all__ = ["BucketingModule"]

_SIDECAR = ".buckets.json"


def _encode_key(key):
    """A bucket key as JSON: ints and strings as they are, tuples as ``{"tuple": [...]}``."""
    if isinstance(key, tuple):
        return {"tuple": [_encode_key(k) for k in key]}
    if isinstance(key, (int, str)) and not isinstance(key, bool):
        return key
    raise ValueError(
        f"bucket key {key!r} ({type(key).__name__}): checkpoints store int, str and tuple keys"
    )


def _decode_key(value):
    if isinstance(value, dict):
        return tuple(_decode_key(v) for v in value["tuple"])
    return value


def _int_keys(keys) -> bool:
    return all(isinstance(k, int) and not isinstance(k, bool) for k in keys)


def _shapes(descs) -> list[tuple]:
    """The shapes of ``DataDesc``s or of ``(name, shape)`` pairs (a DataDesc is such a pair),
    as MXNet takes either."""
    return [tuple(shape) for _, shape in descs or []]


def _size(descs) -> int:
    total = 0
    for shape in _shapes(descs):
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


class BucketingModule(loop.TrainingLoops, _MXNetBucketingModule):
    """``mx.mod.BucketingModule`` on Ray: one worker actor per entry of ``context``.

    Parameters are MXNet's, in MXNet's order. The default bucket should be the largest (the
    others borrow its memory); a larger bucket gets a warning naming it. Call :meth:`close`
    (or use ``with``) to release the workers early.
    """

    def __init__(
        self,
        sym_gen,
        default_bucket_key=None,
        logger=logging,
        context=ctx.cpu(),
        work_load_list=None,
        fixed_param_names=None,
        state_names=None,
        group2ctxs=None,
        compression_params=None,
    ):
        if default_bucket_key is None:
            raise ValueError("default_bucket_key is required (the key of the largest bucket)")
        if compression_params is not None:
            raise NotImplementedError(
                f"compression_params={compression_params!r}: gradient compression is not "
                "supported by raymodule's allreduce; gradients are summed exactly"
            )
        super().__init__(
            sym_gen,
            default_bucket_key,
            logger,
            context,
            work_load_list,
            fixed_param_names,
            state_names,
            group2ctxs,
            None,
        )
        # the buckets' Modules take a list of contexts; checkpoints record the work split
        self._context = [context] if isinstance(context, ctx.Context) else list(context)
        if work_load_list is None:
            self._work_load_list = [1] * len(self._context)
        self._preload_opt_states = None
        self._warned_larger: set = set()

    def _call_sym_gen(self, *args, **kwargs):
        try:
            return super()._call_sym_gen(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the user's function, reported in words
            key = args[0] if args else kwargs
            raise ValueError(
                f"sym_gen({key!r}) failed: {type(err).__name__}: {err}; a batch's bucket_key "
                "must be a key that sym_gen accepts"
            ) from err

    def _new_module(self, symbol, data_names, label_names) -> Module:
        module = Module(
            symbol,
            data_names,
            label_names,
            logger=self.logger,
            context=self._context,
            work_load_list=self._work_load_list,
            fixed_param_names=self._fixed_param_names,
            state_names=self._state_names,
            group2ctxs=self._group2ctxs,
        )
        module._run_floor = self._run_floor  # the default bucket's starts the workers
        return module

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Releases the workers (the buckets share them)."""
        default = self._buckets.get(self._default_bucket_key)
        try:
            for module in self._buckets.values():
                if module is not default:
                    module.close()
        finally:
            if default is not None:
                default.close()

    def __enter__(self) -> BucketingModule:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _reset_bind(self):
        self.close()
        super()._reset_bind()

    @property
    def _default(self) -> Module:
        return self._buckets[self._default_bucket_key]

    @property
    def _params_dirty(self) -> bool:
        """Whether the workers' parameters are newer than the host copy: the buckets share
        workers and parameters, so this is the default bucket's flag once it is bound."""
        default = self.__dict__.get("_buckets", {}).get(self._default_bucket_key)
        if default is not None and default.binded:
            return default._params_dirty
        return self.__dict__.get("_dirty", False)

    @_params_dirty.setter
    def _params_dirty(self, value: bool) -> None:
        default = self.__dict__.get("_buckets", {}).get(self._default_bucket_key)
        if default is not None and default.binded:
            default._params_dirty = value
        else:
            self.__dict__["_dirty"] = value

    # -- bind and buckets ----------------------------------------------------------------------
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
        if self.params_initialized:
            arg_params, aux_params = self.get_params()
        if force_rebind:
            self._reset_bind()
        if self.binded:
            self.logger.warning("Already bound, ignoring bind()")
            return
        if shared_module is not None:
            raise ValueError("shared_module for BucketingModule is not supported (as in MXNet)")
        symbol, data_names, label_names = self._call_sym_gen(self._default_bucket_key)
        module = self._new_module(symbol, data_names, label_names)
        module.bind(
            data_shapes,
            label_shapes,
            for_training,
            inputs_need_grad,
            force_rebind=False,
            shared_module=None,
            grad_req=grad_req,
        )
        self.for_training = for_training
        self.inputs_need_grad = inputs_need_grad
        self._grad_req = grad_req
        self.binded = True
        self._curr_module = module
        self._curr_bucket_key = self._default_bucket_key
        self._buckets[self._default_bucket_key] = module
        if self.params_initialized:
            self.set_params(arg_params, aux_params)

    def switch_bucket(self, bucket_key, data_shapes, label_shapes=None):
        """Switches to the bucket ``bucket_key``, binding it (sharing the default bucket's
        parameters and memory on every worker) the first time it is seen."""
        if not self.binded:
            raise CallOrderError("switch_bucket: call bind() first")
        module = self._buckets.get(bucket_key)
        if module is None:
            symbol, data_names, label_names = self._call_sym_gen(bucket_key)
            self._check_inputs(bucket_key, data_names, label_names)
            module = self._new_module(symbol, data_names, label_names)
            self._buckets[bucket_key] = module
        if not module.binded:
            self._warn_if_larger(bucket_key, data_shapes)
            try:
                module.bind(
                    data_shapes,
                    label_shapes,
                    self._curr_module.for_training,
                    self._curr_module.inputs_need_grad,
                    force_rebind=False,
                    shared_module=self._default,
                    grad_req=self._grad_req,
                )
            except ValueError as err:
                del self._buckets[bucket_key]
                raise ValueError(f"bucket {bucket_key!r}: {err}") from None
            if self._monitor is not None:
                module.install_monitor(self._monitor)
        self._curr_module = module
        self._curr_bucket_key = bucket_key

    def _check_inputs(self, bucket_key, data_names, label_names) -> None:
        default = self._default
        for kind, names, expected in (
            ("data", data_names, default.data_names),
            ("label", label_names, default.label_names),
        ):
            if list(names or []) != list(expected):
                raise ValueError(
                    f"bucket {bucket_key!r}: sym_gen gives {kind} names {list(names or [])}, "
                    f"the default bucket {self._default_bucket_key!r} {list(expected)}; every "
                    "bucket must take the same inputs"
                )

    def _warn_if_larger(self, bucket_key, data_shapes) -> None:
        default = self._default
        if bucket_key in self._warned_larger or _size(data_shapes) <= _size(default.data_shapes):
            return
        self._warned_larger.add(bucket_key)
        warnings.warn(
            f"bucket {bucket_key!r} has larger inputs ({_shapes(data_shapes)}) "
            f"than the default bucket {self._default_bucket_key!r} "
            f"({_shapes(default.data_shapes)}); the other buckets borrow the "
            f"default bucket's memory, so make the largest key ({bucket_key!r}) the "
            "default_bucket_key",
            UserWarning,
            stacklevel=3,
        )

    # -- parameters and optimizer ----------------------------------------------------------------
    def get_params(self):
        """The parameters, read through the default bucket, which holds all of them."""
        if not self.params_initialized:
            raise CallOrderError("get_params: parameters are not initialized")
        return self._default.get_params()

    def init_optimizer(
        self,
        kvstore="local",
        optimizer="sgd",
        optimizer_params=(("learning_rate", 0.01),),
        force_init=False,
    ):
        super().init_optimizer(kvstore, optimizer, optimizer_params, force_init)
        if self._preload_opt_states is not None:
            self._default.load_optimizer_states(self._preload_opt_states)
            self._preload_opt_states = None

    def save_optimizer_states(self, fname):
        """Writes the optimizer states (MXNet's ``.states`` format) to a local path or URI."""
        self._default.save_optimizer_states(fname)

    def load_optimizer_states(self, fname):
        """Reads an MXNet ``.states`` file (a pickle: only load files you trust)."""
        self._default.load_optimizer_states(fname)

    def save_params(self, fname):
        """Saves the parameters in MXNet's ``.params`` format to a local path or URI."""
        self._default.save_params(fname)

    def load_params(self, fname):
        """Loads MXNet ``.params`` from a local path or URI."""
        self._default.load_params(fname)

    # -- checkpoints -----------------------------------------------------------------------------
    def _model_files(self, remove_amp_cast: bool) -> dict[str, bytes]:
        """Suffix -> contents of the files that describe the buckets: MXNet's for int keys,
        and the JSON sidecar that names every key and its symbol file."""
        keys = list(self._buckets)
        files, entries = {}, []
        int_keys = _int_keys(keys)
        for index, key in enumerate(keys):
            suffix = f"-{key}-symbol.json" if int_keys else f"-bucket{index}-symbol.json"
            files[suffix] = self._buckets[key]._symbol_file(remove_amp_cast)
            entries.append({"key": _encode_key(key), "symbol": suffix})
        if int_keys:
            files[".buckets"] = data.nd_bytes(mx.nd.array(keys, dtype="int32"))
        sidecar = {
            "format": 1,
            "default_bucket_key": _encode_key(self._default_bucket_key),
            "buckets": entries,
        }
        files[_SIDECAR] = json.dumps(sidecar, indent=1).encode()
        return files

    def save_checkpoint(self, prefix, epoch, remove_amp_cast=False, save_optimizer_states=False):
        """Saves every bucket's symbol, the parameters and, when asked, the optimizer states;
        ``prefix`` may be a local path or a URI. With int keys the files are MXNet's own."""
        if not self._buckets:
            raise ValueError("Empty BucketingModule cannot be saved: bind it first")
        self.save_params(storage.with_suffix(prefix, "-%04d.params" % epoch))
        for suffix, contents in self._model_files(remove_amp_cast).items():
            storage.write_bytes(storage.with_suffix(prefix, suffix), contents)
        if save_optimizer_states:
            self.save_optimizer_states(storage.with_suffix(prefix, "-%04d.states" % epoch))

    def _checkpoint_files(self) -> dict[str, bytes]:
        return {"model" + suffix: data for suffix, data in self._model_files(True).items()}

    def _param_shapes(self) -> dict[str, list[int]]:
        return self._default._param_shapes()

    @property
    def _snapshot_id(self) -> int:
        return self._default._id

    @property
    def _workers(self):
        return self._default._workers

    @property
    def workers(self):
        """The worker actors the buckets share (``None`` before ``bind``)."""
        return self._default.workers if self._default is not None else None

    @property
    def world_size(self) -> int:
        """Workers training now (see :attr:`raymodule.Module.world_size`)."""
        return self._default.world_size if self._default is not None else len(self._context)

    @staticmethod
    def load(prefix, epoch, sym_gen=None, default_bucket_key=None, **kwargs):
        """Creates a module from a checkpoint written by :meth:`save_checkpoint` or by MXNet's
        ``BucketingModule``; ``prefix`` may be a URI. ``load_optimizer_states=True`` also reads
        ``prefix-%04d.states`` (a pickle) when the optimizer is installed."""
        if sym_gen is None or default_bucket_key is None:
            raise ValueError("load: sym_gen and default_bucket_key are required")
        load_optimizer_states = kwargs.pop("load_optimizer_states", False)
        try:
            sidecar = json.loads(storage.read_bytes(storage.with_suffix(prefix, _SIDECAR)))
            buckets = [(_decode_key(b["key"]), b["symbol"]) for b in sidecar["buckets"]]
        except FileNotFoundError:  # written by MXNet: int keys
            (keys,) = mx.nd.load_frombuffer(
                storage.read_bytes(storage.with_suffix(prefix, ".buckets"))
            )
            buckets = [(int(k), f"-{int(k)}-symbol.json") for k in keys.asnumpy()]
        params = storage.read_bytes(storage.with_suffix(prefix, "-%04d.params" % epoch))
        arg_params, aux_params = data.split_params(mx.nd.load_frombuffer(params))
        mod = BucketingModule(sym_gen, default_bucket_key, **kwargs)
        for key, suffix in buckets:
            _, data_names, label_names = mod._call_sym_gen(key)
            symbol_json = storage.read_bytes(storage.with_suffix(prefix, suffix)).decode()
            module = mod._new_module(mx.sym.load_json(symbol_json), data_names, label_names)
            mod._buckets[key] = module
            if key == default_bucket_key:
                mod._curr_module = module
        if mod._curr_module is None:
            raise ValueError(
                f"the checkpoint at {storage.redact(prefix)!r} has no bucket "
                f"{default_bucket_key!r}; its keys: {[k for k, _ in buckets]}"
            )
        mod._curr_module._arg_params = arg_params
        mod._curr_module._aux_params = aux_params
        mod._curr_module.params_initialized = True
        mod.params_initialized = True
        if load_optimizer_states:
            mod._preload_opt_states = storage.with_suffix(prefix, "-%04d.states" % epoch)
        return mod

    @staticmethod
    def load_dict(
        sym_dict=None, sym_gen=None, default_bucket_key=None, arg_params=None, aux_params=None,
        **kwargs,
    ):  # fmt: skip
        """Creates a module from ``{bucket_key: symbol}`` and shared parameters, as MXNet's."""
        if sym_dict is None or arg_params is None or aux_params is None:
            raise ValueError("load_dict: sym_dict, arg_params and aux_params are required")
        if default_bucket_key is None:
            raise ValueError("load_dict: default_bucket_key is required")
        mod = BucketingModule(sym_gen, default_bucket_key, **kwargs)
        _, data_names, label_names = mod._call_sym_gen(default_bucket_key)
        for key, symbol in sym_dict.items():
            mod._buckets[key] = mod._new_module(symbol, data_names, label_names)
            if key == default_bucket_key:
                mod._curr_module = mod._buckets[key]
        mod._curr_module._arg_params = arg_params
        mod._curr_module._aux_params = aux_params
        mod._curr_module.params_initialized = True
        mod.params_initialized = True
        return mod

    # -- training loops --------------------------------------------------------------------------
    def _step_module(self, data_batch, flush) -> Module:
        """The bucket that runs ``data_batch`` in the step loop."""
        self.switch_bucket(data_batch.bucket_key, *self._descs_of(data_batch))
        return self._curr_module._step_module(data_batch, flush)

    def _descs_of(self, data_batch):
        if data_batch.provide_data is not None:
            return data_batch.provide_data, data_batch.provide_label
        names = self._default.data_names, self._default.label_names
        return (
            [DataDesc(n, a.shape, a.dtype) for n, a in zip(names[0], data_batch.data)],
            [DataDesc(n, a.shape, a.dtype) for n, a in zip(names[1], data_batch.label or [])],
        )
