"""The worker actor: native MXNet module replicas on one device, and its share of each step.

A worker holds one ``mx.mod.Module`` per raymodule module bound on it (modules bound with
``shared_module`` share parameters and memory here exactly as in MXNet), and this process's
membership in the gradient group. It never imports the facade.

MXNet is imported in the worker process only, when the actor starts, and torch only when its
group needs the network (:mod:`.collective` says when): the controller creates workers from
this class without paying seconds of imports.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mxnet as mx
    import numpy as np

    from ..data import StreamReader
    from .collective import Alone, Collective
    from .shm import PartlyUpdated

from ..checkpoint.snapshot import Snapshot
from ..data.parts import Batch, IndexedParts, PartPlan, StreamParts
from ..errors import GroupBrokenError, first_line
from ..mxnet_import import import_mxnet
from ..sealed import seal
from .cores import Pinning, cores_name

__all__ = ["ModuleWorker"]

log = logging.getLogger(__name__)

_DATASETS_KEPT = 4  # datasets a worker keeps read (each one a zero-copy view of the store)


def _import_runtime() -> None:
    """Binds this module's MXNet-dependent names; runs once, in the worker process."""
    global mx, np, DataBatch, metrics, native, nd_buffer, optimizer_state, to_ndarray, Placed
    global ndarray_view, split_shapes
    global StreamReader, PartlyUpdated, Alone
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")  # no backend banner per executor
    import_mxnet()
    import mxnet as mx
    import numpy as np
    from mxnet.io import DataBatch

    from .. import metrics
    from ..checkpoint import optimizer_state
    from ..data import StreamReader, nd_buffer, ndarray_view, split_shapes, to_ndarray
    from ..views import Placed
    from . import native
    from .collective import Alone
    from .shm import PartlyUpdated


def _numpy_list(arrays) -> list[np.ndarray]:
    return [a.asnumpy() for a in arrays]


def _nd_dict(arrays: dict) -> dict:
    return {k: to_ndarray(v) for k, v in arrays.items()}


class ModuleWorker:
    """One data-parallel replica. Methods take the id of the module they act on."""

    def __init__(
        self,
        device_type: str,
        allreduce_bucket_bytes: int,
        shm_allreduce: bool,
        pin_cores: bool,
        split_update: bool,
    ):
        _import_runtime()
        self.device = mx.Context(device_type, 0)
        self._modules: dict[int, mx.mod.Module] = {}
        self._collective: Collective | Alone = Alone()
        self._bucket_bytes = allreduce_bucket_bytes
        self._shm_allreduce = shm_allreduce
        self._split_update = split_update
        self._pinning = Pinning(pin_cores)  # the cores: its share of them while in a group
        self._metric: mx.metric.EvalMetric | None = None
        self._metric_here = False  # the metric's counters are updated on this worker
        self._applied = 0
        self._broken: str | None = None  # why the collective group broke, until re-formed
        self._generation = 0
        self._shut_down = False  # SIGTERM came: the controller removes this worker gracefully
        self._datasets: dict = {}  # the datasets read lately, by key (_kept)
        self._streams: dict = {}  # the Ray Dataset splits read lately: StreamReaders (_kept)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note_shutdown)

    def _note_shutdown(self, signum, frame) -> None:
        """SIGTERM (a preemption notice, Ray's graceful node shutdown): instead of dying in a
        step, this worker says so with its next steps' results, and the controller removes it
        at a step boundary (ray.kill; Ray's grace period bounds the wait)."""
        # debug only: the controller reports the leave (a membership event), and Ray's own
        # shutdown sends SIGTERM to every worker, where a warning would be noise
        if not self._shut_down:
            log.debug("SIGTERM: leaving the group at the next step boundary")
        self._shut_down = True

    # -- membership -------------------------------------------------------------------------
    def describe(self, grouped: bool = True) -> dict:
        """Where this worker runs (also: the actor is up): its node, process, and the name
        of the cores it may run on (:func:`~.cores.cores_name`). A worker that may have
        peers (``grouped``) has the collective's modules imported by then, so that forming a
        group waits for no imports: torch too when its group may need the network (a cluster
        of several nodes, or no shared-memory sum). One that never will, or whose group can
        only be on its node, does without torch."""
        import ray

        if grouped:
            from . import collective  # noqa: F401 - light: MXNet is imported already

            alive = sum(1 for node in ray.nodes() if node["Alive"])
            if alive > 1 or not self._shares_memory() or self.device.device_type != "cpu":
                from . import process_group  # noqa: F401 - torch: seconds of CPU

        context = ray.get_runtime_context()
        return {
            "node": context.get_node_id(),
            "actor": context.get_actor_id(),  # what a peer's call that needed it says died
            "pid": os.getpid(),
            # the cores it was allowed at its start: the same name pinned or not
            "cores_name": cores_name(self._pinning.allowed),
            "shared_memory": self._shares_memory(),  # may sum with its node's in /dev/shm
        }

    def _shares_memory(self) -> bool:
        """Whether this worker sums dense gradients with its node's workers through shared
        memory: asked to (RAYMODULE_SHM_ALLREDUCE), and on a machine where that is right."""
        from .shm import usable_here

        return self._shm_allreduce and usable_here()

    def rendezvous_address(self) -> str:
        from .collective import free_address

        return free_address()

    def leave(self, generation: int | None = None) -> None:
        """Leaves the collective group, broken or not; calls that follow belong to
        ``generation`` of the group (when given)."""
        if generation is not None:
            self._generation = generation

        group, self._collective = self._collective, Alone()
        had_peers = group.has_peers
        group.close()
        del group
        if had_peers:
            # The group's sockets close only when nothing refers to it any more (a failed
            # call's traceback does): until then a peer blocked on this worker waits out the
            # whole collective timeout instead of failing at once.
            gc.collect()
        self._pinning.pin(0, 1)
        self._broken = None

    def join(self, world_size, rank, rendezvous, backend, timeout_s, generation, place) -> None:
        """Joins generation ``generation`` of the group as ``rank``; ``rendezvous``: rank 0's
        address, or the shared memory's (:class:`~raymodule.worker.shm.SameNode`); ``place``:
        its index among the group's workers on its cores, and how many they are
        (:func:`~.cores.places`), which decide the cores it runs on."""
        from .collective import Collective

        self.leave()
        self._collective = Collective(
            world_size, rank, rendezvous, backend, timeout_s, shared_memory=self._shm_allreduce
        )
        self._pinning.pin(*place)
        self._generation = generation

    def applied(self) -> int:
        """Training steps whose update this replica has applied (every replica agrees, except
        after a failed step: then at most one ahead of another)."""
        return self._applied

    def _check_group(self) -> None:
        if self._broken is not None:
            raise GroupBrokenError(
                f"the collective group of generation {self._generation} broke ({self._broken}); "
                "this worker waits for the group to be formed again"
            )

    # -- module life cycle ------------------------------------------------------------------
    def create(
        self,
        mid: int,
        symbol,
        data_names,
        label_names,
        fixed_param_names,
        state_names,
        group2ctxs,
        device_id: int,
    ) -> None:
        """A replica for the module's context ``device_id``: on that very ``cpu(i)`` (any id
        is this process's memory), so its arrays live where MXNet's would; on this worker's
        own GPU, which it sees as index 0."""
        on_cpu = self.device.device_type == "cpu"
        self._modules[mid] = mx.mod.Module(
            symbol,
            data_names=data_names,
            label_names=label_names,
            logger=log,
            context=mx.cpu(device_id) if on_cpu else self.device,
            fixed_param_names=fixed_param_names,
            state_names=state_names,
            group2ctxs=group2ctxs,
        )

    def drop(self, mid: int) -> None:
        self._modules.pop(mid, None)

    def bind(
        self, mid, for_training, inputs_need_grad, shared_mid, grad_req, shapes, work_load, index
    ) -> dict[str, tuple[str, str | None]]:
        """Binds the replica to its share of the global ``shapes`` (``(data_shapes,
        label_shapes)``): share ``index`` of the split by ``work_load``. Returns the storage
        types of each parameter and of its gradient (None without one)."""
        mod = self._modules[mid]
        shared = self._modules[shared_mid] if shared_mid is not None else None
        data_shapes, label_shapes = split_shapes(*shapes, work_load)[1][index]
        mod.bind(
            data_shapes,
            label_shapes,
            for_training=for_training,
            inputs_need_grad=inputs_need_grad,
            force_rebind=True,
            shared_module=shared,
            grad_req=grad_req,
        )
        return native.param_stypes(mod)

    def reshape(self, mid, shapes, work_load, index) -> None:
        """Reshapes the replica to its share of the global ``shapes`` (see :meth:`bind`)."""
        self._modules[mid].reshape(*split_shapes(*shapes, work_load)[1][index])

    def set_params(self, mid, arg_params, aux_params, allow_missing, allow_extra) -> None:
        self._modules[mid].set_params(
            _nd_dict(arg_params),
            _nd_dict(aux_params),
            allow_missing=allow_missing,
            force_init=True,
            allow_extra=allow_extra,
        )

    def get_params(self, mid) -> tuple[dict, dict]:
        return native.host_params(self._modules[mid])

    def params_after(self, mid, expected: int) -> tuple[dict, dict] | None:
        """:meth:`get_params` if this replica has applied ``expected`` steps, else None (a
        step before failed: it is run again after the group is formed anew)."""
        if self._broken is not None or expected != self._applied:
            return None
        return native.host_params(self._modules[mid])

    def init_optimizer(self, mid, optimizer, optimizer_params, force_init) -> None:
        with warnings.catch_warnings():
            # rescale_grad is set by the client for the global batch, which MXNet cannot know.
            warnings.simplefilter("ignore")
            self._modules[mid].init_optimizer(
                kvstore=None,
                optimizer=optimizer,
                optimizer_params=optimizer_params,
                force_init=force_init,
            )
        native.update_per_parameter(self._modules[mid])

    def borrow_optimizer(self, mid, shared_mid) -> None:
        self._modules[mid].borrow_optimizer(self._modules[shared_mid])

    def optimizer_states(self, mid) -> bytes:
        return native.updater(self._modules[mid]).get_states(dump_optimizer=False)

    def set_optimizer_states(self, mid, states: bytes) -> None:
        native.updater(self._modules[mid]).set_states(states)

    def snapshot(self, mid, expected: int | None = None) -> Snapshot | None:
        """This replica's parameters and optimizer state as they stand after the steps run so
        far (every replica holds the same). None when this replica is not at the ``expected``
        step: a step before the call failed (it is run again after the group is formed anew)."""
        if self._broken is not None or (expected is not None and expected != self._applied):
            return None
        mod = self._modules[mid]
        arrays, description = {}, None
        if mod.optimizer_initialized:
            arrays, description = optimizer_state.capture(native.updater(mod))
        params = nd_buffer(native.device_params(mod))
        return Snapshot(params, nd_buffer(arrays), description, self._applied)

    def restore_optimizer(self, mid, arrays, description: dict) -> None:
        mod = self._modules[mid]
        loaded = mx.nd.load_frombuffer(bytes(arrays))
        device_id = native.device_id(mod)  # where this replica's weights are
        optimizer_state.restore(native.updater(mod), loaded or {}, description, device_id)

    def restore(self, mid, snapshot: Snapshot) -> None:
        """Takes a peer's :meth:`snapshot`: parameters, optimizer state, steps applied."""
        mod = self._modules[mid]
        loaded = mx.nd.load_frombuffer(bytes(snapshot.params))
        arg = {k[4:]: v for k, v in loaded.items() if k.startswith("arg:")}
        aux = {k[4:]: v for k, v in loaded.items() if k.startswith("aux:")}
        mod.set_params(arg, aux, allow_missing=False, force_init=True, allow_extra=False)
        if snapshot.optimizer is not None and mod.optimizer_initialized:
            self.restore_optimizer(mid, snapshot.optimizer_arrays, snapshot.optimizer)
        self._applied = snapshot.applied

    # -- computation ------------------------------------------------------------------------
    def _load(self, mid, batch: Batch, is_train) -> tuple[mx.mod.Module, list]:
        """Runs forward on this worker's part of a batch; returns the module and its labels."""
        mod = self._modules[mid]
        labels = [ndarray_view(a) for a in batch.label]
        mod.forward(
            DataBatch(data=[ndarray_view(a) for a in batch.data], label=labels or None),
            is_train=is_train,
        )
        return mod, labels

    def forward(self, mid, batch: Batch, is_train) -> None:
        self._load(mid, batch, is_train)

    def backward(self, mid, out_grads) -> None:
        grads = None if out_grads is None else [to_ndarray(g) for g in out_grads]
        self._modules[mid].backward(grads)

    def update(self, mid) -> None:
        mod = self._modules[mid]
        self._check_group()  # broken in a step before, in this call: this one is not applied
        grad_arrays, accumulating = native.gradient_arrays(mod)
        if accumulating and self._collective.has_peers:
            # 'add' keeps accumulating this worker's own gradients; the sum goes to copies
            grad_arrays = [[g[0].copy()] if g[0] is not None else g for g in grad_arrays]
        # Reverse parameter order: the last layers' gradients are ready first.
        grads = [g[0] for g in reversed(grad_arrays) if g[0] is not None]
        by_element = native.updates_by_element(mod)  # some dense gradients, of one dtype
        split = (
            self._split_update
            and by_element
            and self._collective.splits_update(grads, self._bucket_bytes)
        )
        # SGD's kernels only read the gradients: they may read the sums where they were summed
        shared = (
            by_element and not split and self._collective.shares_sums(grads, self._bucket_bytes)
        )
        counts = native.update_counts(mod) if split else None
        why, rest = None, None
        try:
            if split:
                self._reduce_and_update_in_parts(mod, grad_arrays, grads)
            elif shared:
                sums = reversed(self._collective.reduce_shared(grads))  # in parameter order
                grad_arrays = [g if g[0] is None else [next(sums)] for g in grad_arrays]
            else:
                self._collective.reduce(grads, self._bucket_bytes)
        except PartlyUpdated as err:  # this worker's part updated, the others' maybe not
            why, rest = first_line(err)[:200], [(0, err.lo), (err.hi, err.count)]
        except Exception as err:  # noqa: BLE001 - a peer lost or silent: the step is not applied
            why = f"{type(err).__name__}: {first_line(err)[:200]}"
        if why is not None:
            # Close this end at once, out of the except block (whose traceback holds the
            # group): a peer waiting for data from this worker then fails now too, wherever
            # in the ring the lost worker was, instead of after the collective timeout.
            self.leave()
            self._broken = why
            if rest is None:
                self._check_group()
            # Every rank's gradients were in: the rest updated here from the sum, as every
            # survivor does, so they stay alike and the step is applied.
            native.apply_update_parts(mod, grad_arrays, rest, counts)
        elif split:
            pass  # updated in parts as it was summed
        elif by_element:
            native.apply_update_parts(mod, grad_arrays)
        else:
            native.apply_update(mod, grad_arrays)
        self._applied += 1

    def _reduce_and_update_in_parts(self, mod, grad_arrays: list, grads: list) -> None:
        """Sums ``grads`` and splits the update among this node's ranks: this worker updates
        its part of the weights and their momentum, and takes the others' parts through the
        shared memory (:meth:`Collective.reduce_and_update`)."""
        weights, states = native.updated_arrays(mod)
        groups = [  # laid out as the gradients; SGD without momentum has no state
            native.host_views(list(reversed(arrays)))
            for arrays in (weights, states)
            if all(a is not None for a in arrays)
        ]

        def update(lo: int, hi: int) -> None:
            native.apply_update_parts(mod, grad_arrays, [(lo, hi)])
            native.wait_for_engine()  # done with them before they are shared

        self._collective.reduce_and_update(grads, update, groups)

    def set_metric(self, metric: mx.metric.EvalMetric | None) -> None:
        self._metric = metric
        self._metric_here = metric is not None and metrics.runs_on_workers(metric)

    def _step_metric(self, mod, labels: list):
        """Counter increments if the metric runs here, else this slice's outputs."""
        if self._metric_here:
            self._metric.reset()
            mod.update_metric(self._metric, labels)
            return metrics.counters(self._metric)
        return _numpy_list(mod.get_outputs())

    def steps(self, kind: str, mids: list[int], batches, generation: int, plan=None) -> list:
        """Runs ``kind`` ("train_step" or "eval_step") on consecutive global batches, each on
        the module named by ``mids`` (a bucketing module's buckets differ from batch to batch).

        ``batches`` is this worker's part of each batch, as the client put it in the object
        store; or its rows of each batch as dataset indices (:class:`IndexedParts`), which it
        reads from the dataset itself, a step ahead in a background thread; or its share of a
        Ray Dataset's steps (:class:`StreamParts`), streamed from its split; or, with ``plan``
        (a :class:`PartPlan`), references to parts put for another split (the steps are sent
        again to a group that re-formed). Every wait for rows is bounded by the timeout they
        carry.

        Several steps per call: one object-store transfer and one call per chunk, where each
        costs about a millisecond, instead of one per batch. Returns the steps' results, the
        seconds they took here, those of them it computed (not waiting for the others' part of
        the gradient sums) and whether this worker was told to shut down (SIGTERM). A
        call sent to an earlier ``generation`` of the group (it was in flight when the group
        re-formed) runs nothing: its steps are sent again.
        """
        step = {"train_step": self.train_step, "eval_step": self.eval_step}[kind]
        self._check_group()
        if generation != self._generation:
            raise GroupBrokenError(
                f"steps sent to generation {generation} of the group reached generation "
                f"{self._generation}; they are sent again"
            )
        group = self._collective
        try:
            batches = self._batches(batches, plan)
            tic = time.perf_counter()  # rows still read meanwhile (a dataset's): step time
            waited = group.waited_s
            results = [step(mid, batch) for mid, batch in zip(mids, batches)]
        except GroupBrokenError:
            raise
        except Exception as err:
            if kind == "train_step":
                # its peers wait at this step's sum (or the first of these steps', its rows
                # not read): they fail now, and never sum a later step of this worker's with it;
                # and its own calls behind this one apply none of their steps, alone or not
                self.leave()
                self._broken = f"worker failed in a step: {type(err).__name__}"
            raise
        took = time.perf_counter() - tic
        computing = took - (group.waited_s - waited)
        return results, took, computing, self._shut_down

    def _batches(self, batches, plan) -> Iterable[Batch]:
        """:meth:`steps`' batches, from what it was sent (see there)."""
        if isinstance(batches, IndexedParts):
            return self._read(batches)
        if isinstance(batches, StreamParts):
            reader = _kept(self._streams, batches.key, StreamReader, StreamReader.close)
            return reader.batches(batches)
        if plan is not None:
            return assemble(batches, plan)
        return batches

    def _read(self, parts: IndexedParts) -> Iterator[Batch]:
        """The batches ``parts`` names, read (a step ahead) from the dataset as this worker
        first received it: the dataset arrives with every call, and the copy kept by its
        :meth:`~raymodule.data.Dataset.key` is the one read (an ArrayDataset's arrays fetched
        zero-copy once, a RecordIO file opened once)."""
        dataset = _kept(self._datasets, parts.dataset.key(), lambda: parts.dataset)
        return dataclasses.replace(parts, dataset=dataset).batches()

    def train_step(self, mid, batch: Batch):
        mod, labels = self._load(mid, batch, True)
        mod.backward()
        self.update(mid)
        return self._step_metric(mod, labels) if self._metric is not None else None

    def eval_step(self, mid, batch: Batch):
        mod, labels = self._load(mid, batch, False)
        return self._step_metric(mod, labels)

    def outputs(self, mid) -> list[np.ndarray]:
        return _numpy_list(self._modules[mid].get_outputs())

    def input_grads(self, mid) -> list[np.ndarray]:
        return _numpy_list(self._modules[mid].get_input_grads())

    def array_contexts(self, mid) -> dict[str, list[tuple[str, int]]]:
        """Where the arrays that ``outputs``, ``input_grads`` and ``get_states`` read live:
        (device type, id) each; fixed once bound (``group2ctxs`` places them)."""
        mod = self._modules[mid]

        def where(arrays) -> list[tuple[str, int]]:
            return [(a.context.device_type, a.context.device_id) for a in arrays]

        return {
            "outputs": where(mod.get_outputs()),
            "input_grads": where(mod.get_input_grads()) if mod.inputs_need_grad else [],
            "get_states": where(s[0] for s in mod.get_states(merge_multi_context=False)),
        }

    # -- what the client's read-only views of MXNet's private state read -------------------------
    def executor(self, mid, which: str):
        """This replica's executor's ``arg_dict``, ``grad_dict`` or ``aux_dict`` (by name),
        or its ``outputs`` (a list), each array :class:`Placed` (None where MXNet holds none:
        an argument without a gradient)."""
        arrays = native.executor_arrays(self._modules[mid], which)
        # sealed: the controller relays them to the client unopened (views.py imports MXNet)
        if which == "outputs":
            return seal([Placed.of(a) for a in arrays])
        return seal({name: Placed.of(a) for name, a in arrays.items()})

    def exec_group(self, mid) -> dict:
        """What MXNet's executor group says of itself beyond its arrays."""
        return native.exec_group_facts(self._modules[mid])

    def updater_states(self, mid) -> dict:
        """The optimizer's states by parameter index (one device here: MXNet's index is the
        parameter's), each NDArray :class:`Placed`, tuples and lists kept."""

        def placed(state):
            if isinstance(state, (tuple, list)):
                return type(state)(placed(s) for s in state)
            return Placed.of(state) if isinstance(state, mx.nd.NDArray) else state

        states = native.updater(self._modules[mid]).states  # sealed: see executor()
        return seal({index: placed(s) for index, s in states.items()})

    def get_states(self, mid) -> list[np.ndarray]:
        # one device here: MXNet's per-device list holds one array per state
        return [s[0].asnumpy() for s in self._modules[mid].get_states(merge_multi_context=False)]

    def set_states(self, mid, states, value) -> None:
        if states is not None:
            states = [[to_ndarray(s)] for s in states]
        self._modules[mid].set_states(states, value)

    # -- monitoring ---------------------------------------------------------------------------
    def install_monitor(self, mid, monitor) -> None:
        self._monitor = monitor
        self._modules[mid].install_monitor(monitor)

    def monitor_tic(self) -> None:
        self._monitor.tic()

    def monitor_toc(self) -> list:
        return self._monitor.toc()


def _kept(cache: dict, key, make, drop=lambda value: None):
    """``cache[key]`` (made by ``make()`` if absent), now the newest entry: a few are kept
    (training's and validation's data), the oldest beyond them dropped (``drop(value)``)."""
    value = cache.pop(key) if key in cache else make()
    cache[key] = value
    while len(cache) > _DATASETS_KEPT:
        drop(cache.pop(next(iter(cache))))
    return value


def assemble(sources: list, plan: PartPlan) -> list[Batch]:
    """The batches ``plan`` names (see :func:`raymodule.controller.chunks.worker_args`),
    fetching only the sources it reads, within ``plan.timeout_s``."""
    import ray

    needed = sorted({source for pieces in plan.pieces for source, _, _, _ in pieces})
    try:
        fetched = dict(zip(needed, ray.get([sources[i] for i in needed], timeout=plan.timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"the parts of the steps sent again (objects "
            f"{', '.join(sources[i].hex()[:16] for i in needed)}) were not read within "
            f"{plan.timeout_s:g} s (RAYMODULE_DATA_TIMEOUT_S)"
        ) from None
    batches = []
    for pieces in plan.pieces:
        parts = []
        for source, item, start, stop in pieces:
            part = fetched[source][item]
            rows = part.worker_slice(slice(start, stop))
            parts.append(Batch(*rows, part.data_axes, part.label_axes))
        batches.append(Batch.join(parts))
    return batches
