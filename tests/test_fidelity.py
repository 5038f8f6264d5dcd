"""Differential tests: the same call sequence on MXNet's modules and on raymodule's.

A case is a function ``case(lib, record)``: it builds modules with ``lib.Module(...)`` or
``lib.BucketingModule(...)`` (MXNet's with N contexts in one process, or raymodule's with N
workers) and passes each call whose outcome matters through ``record``, which keeps what it
returned (arrays with their contexts) or what it raised. Both runs start from the same seeds
of ``random``, ``numpy.random`` and ``mx.random``, and end by drawing from each, so every case
also checks that raymodule left the caller's random streams where MXNet leaves them. A new
case is a decorated function of a few lines.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

import mxnet as mx
import numpy as np
import pytest
from conftest import dataset, mlp
from test_bucketing import batches, lstm_sym_gen

import raymodule

SGD = {"learning_rate": 0.1, "momentum": 0.9}
SHAPES = ([("data", (12, 20))], [("softmax_label", (12,))])


@dataclass(frozen=True)
class Raised:
    """An exception a step raised: raymodule's must be an instance of MXNet's type; the message
    is compared only for steps recorded with :meth:`Record.exact`."""

    type: type
    message: str
    exact: bool


def plain(value):
    """``value`` in a form two runs can be compared in: arrays as (context, numpy)."""
    if isinstance(value, mx.nd.NDArray):
        return ("NDArray", str(value.context), value.asnumpy())
    if isinstance(value, mx.io.DataDesc):
        return ("DataDesc", value.name, tuple(value.shape), np.dtype(value.dtype), value.layout)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class Record:
    """The outcome of every step of a case, in order."""

    def __init__(self):
        self.outcomes: list = []

    def __call__(self, fn, *args, **kwargs):
        return self._run(False, fn, args, kwargs)

    def exact(self, fn, *args, **kwargs):
        """Like calling the record, and an exception's message must be MXNet's word for word."""
        return self._run(True, fn, args, kwargs)

    def _run(self, exact, fn, args, kwargs):
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - what MXNet raises is the point
            self.outcomes.append(Raised(type(err), str(err), exact))
            return None
        self.outcomes.append(plain(result))
        return result


class Lib:
    """Builds one implementation's modules on ``workers`` contexts and closes them after."""

    def __init__(self, package, workers: int):
        self.package = package
        self.contexts = [mx.cpu(i) for i in range(workers)]
        self.made: list = []

    def _made(self, module):
        self.made.append(module)
        return module

    def Module(self, symbol, **kwargs):  # noqa: N802 - MXNet's name
        return self._made(self.package.Module(symbol, context=self.contexts, **kwargs))

    def BucketingModule(self, sym_gen, default_bucket_key, **kwargs):  # noqa: N802
        return self._made(
            self.package.BucketingModule(
                sym_gen, default_bucket_key, context=self.contexts, **kwargs
            )
        )

    def done(self, module) -> None:
        """Releases a module's workers before the case ends (the session's Ray has 4 CPUs)."""
        if hasattr(module, "close"):
            module.close()

    def close(self) -> None:
        for module in self.made:
            if hasattr(module, "close"):
                module.close()


def seed_all() -> None:
    random.seed(1)
    np.random.seed(2)
    mx.random.seed(3)


def next_draws() -> tuple:
    return random.random(), float(np.random.rand()), float(mx.random.uniform().asscalar())


def run(case, package, workers: int) -> list:
    seed_all()
    lib, record = Lib(package, workers), Record()
    try:
        case(lib, record)
    finally:
        lib.close()
    return record.outcomes + [("next draws", next_draws())]


def assert_same(expected, actual, where: str) -> None:
    if isinstance(expected, Raised):
        assert isinstance(actual, Raised), (
            f"{where}: MXNet raised {expected}, raymodule gave a value"
        )
        assert issubclass(actual.type, expected.type), f"{where}: {actual} is not {expected}"
        if expected.exact:
            assert actual.message == expected.message, where
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{where}: {actual!r}"
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=where)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), (
            f"{where}: {actual!r} vs MXNet's {expected!r}"
        )
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), where
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-5), where
    else:
        assert actual == expected, f"{where}: {actual!r} vs MXNet's {expected!r}"


CASES: list = []


def case(*workers: int):
    """Registers a case, run on each number of workers given (2 if none)."""

    def register(fn):
        CASES.extend(pytest.param(fn, n, id=f"{fn.__name__}-{n}w") for n in workers or (2,))
        return fn

    return register


@pytest.mark.parametrize("steps, workers", CASES)
def test_same_as_mxnet(steps, workers):
    expected, actual = run(steps, mx.mod, workers), run(steps, raymodule, workers)
    assert len(actual) == len(expected)
    for index, (e, a) in enumerate(zip(expected, actual)):
        assert_same(e, a, f"{steps.__name__} step {index}")


# -- cases -----------------------------------------------------------------------------------
@case(1, 2, 3)
def fit_score_predict(lib, record):
    x, y = dataset(n=48)
    it = mx.io.NDArrayIter(x, y, batch_size=12, shuffle=True)  # shuffles with numpy.random
    mod = lib.Module(mlp())
    mod.bind(it.provide_data, it.provide_label)
    mod.init_params()  # mx.random
    record(lambda: mod.get_params()[0])
    mod.fit(it, num_epoch=2, optimizer_params=SGD)
    record(lambda: mod.get_params()[0])
    record(mod.score, it, ["acc", "ce"])
    record(mod.predict, it)


def test_starting_ray_and_workers_leaves_the_callers_random_streams_alone():
    """In a process without Ray: seeded like MXNet code, a raymodule.Module that starts Ray
    and its workers, initialises, fits and predicts leaves every stream where mx.mod.Module
    leaves it, and starts from MXNet's initial parameters."""
    script = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import mxnet as mx, ray
        from test_fidelity import fit_score_predict, run
        import raymodule
        assert not ray.is_initialized()
        expected = run(fit_score_predict, mx.mod, 2)
        actual = run(fit_score_predict, raymodule, 2)
        assert ray.is_initialized()
        initial = all((expected[0][n][2] == actual[0][n][2]).all() for n in expected[0])
        print("RESULT", json.dumps({"draws": [expected[-1][1], actual[-1][1]],
                                    "same_initial_params": bool(initial)}))
    """)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="rmf-", dir="/tmp") as short:  # Ray's socket paths
        env["RAY_TMPDIR"] = short
        out = subprocess.run(
            [sys.executable, "-c", script, os.path.dirname(os.path.abspath(__file__))],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, out.stdout + out.stderr
    result = json.loads(line.split(" ", 1)[1])
    native, ours = result["draws"]
    assert ours == native  # random, numpy.random and mx.random: the very same next draws
    assert result["same_initial_params"]


def bound_mlp(lib, **bind_args):
    mod = lib.Module(mlp())
    mod.bind(*SHAPES, **bind_args)
    mod.init_params()
    return mod


def forward_outputs(mod, n=12, seed=0):
    x, y = dataset(n=n, seed=seed)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]), is_train=False)
    return mod.get_outputs()


@case(1, 2)
def set_params_with_names_the_symbol_lacks(lib, record):
    """MXNet 1.9.1 checks names only where it copies the caller's dicts (allow_missing=True):
    it stops at the first unknown name, having copied those before it, and raises."""
    mod = bound_mlp(lib)
    arg, aux = (lambda a: ({k: v + 1 for k, v in a[0].items()}, a[1]))(mod.get_params())
    extra = {"extra_weight": mx.nd.ones((2,))}
    record.exact(mod.set_params, {**arg, **extra}, aux)  # the allow_missing=False path: no check
    arg = {k: v + 1 for k, v in arg.items()}
    record.exact(mod.set_params, {**arg, **extra}, aux, allow_missing=True)
    record(lambda: mod.get_params()[0])  # MXNet's host copy did not see that update
    if len(lib.contexts) == 1:  # its first device did; MXNet stops before the others
        record(forward_outputs, mod)
    record.exact(mod.set_params, {**extra, **arg}, aux, allow_missing=True)
    record.exact(mod.set_params, arg, {"extra_aux": mx.nd.ones((2,))}, allow_missing=True)
    record(mod.set_params, {**arg, **extra}, aux, allow_missing=True, allow_extra=True)
    record(forward_outputs, mod)
    record.exact(mod.init_params, None, {**arg, **extra}, aux, force_init=True)


@case(1, 2, 3)
def set_params_with_missing_names_or_wrong_shapes(lib, record):
    mod = bound_mlp(lib)
    arg, aux = mod.get_params()
    arg = {k: v * 2 for k, v in arg.items()}
    missing = {k: v for k, v in arg.items() if k != "fc0_bias"}
    record.exact(mod.set_params, missing, aux)
    record.exact(mod.init_params, None, missing, aux, force_init=True)
    record(mod.init_params, mx.init.Zero(), missing, aux, allow_missing=True, force_init=True)
    record(lambda: mod.get_params()[0])
    record(mod.set_params, missing, aux, allow_missing=True)
    record(forward_outputs, mod)
    wrong = {**arg, "fc0_weight": mx.nd.ones((3, 3))}
    record(mod.set_params, wrong, aux)
    record(mod.set_params, wrong, aux, allow_missing=True)
    record(mod.set_params, arg, aux, force_init=False)  # ignored with a warning
    record(forward_outputs, mod)


def shapes(mod):
    return mod.data_shapes, mod.label_shapes, mod.output_shapes


@case(1, 2, 3)
def bind_and_reshape_take_pairs_descs_lists_and_tuples(lib, record):
    mod = lib.Module(mlp())
    mod.bind((("data", (12, 20)),), [mx.io.DataDesc("softmax_label", (12,))])
    record(shapes, mod)
    mod.init_params()
    record(forward_outputs, mod)
    mod.reshape([mx.io.DataDesc("data", (6, 20))], (("softmax_label", (6,)),))
    record(shapes, mod)
    record(mod.reshape, (("data", (9, 20)),), [("softmax_label", (9,))])
    record(shapes, mod)
    record(forward_outputs, mod, n=9)


@case(1, 2, 3)
def switch_bucket_takes_name_shape_pairs(lib, record):
    mod = lib.BucketingModule(lstm_sym_gen, default_bucket_key=8)
    mod.bind([("data", (12, 8))], [("softmax_label", (12, 8))])
    mod.init_params()
    mod.switch_bucket(5, [("data", (12, 5))], [("softmax_label", (12, 5))])
    record(shapes, mod)
    mod.switch_bucket(4, (mx.io.DataDesc("data", (12, 4)),), (("softmax_label", (12, 4)),))
    record(shapes, mod)
    for data_batch in batches([5, 8, 4], batch_size=12):
        mod.forward(data_batch, is_train=False)
        record(mod.get_outputs)
    record(lambda: sorted(mod._buckets))


def every_result(mod):
    """What the module gives back after a training forward-backward, merged and per worker."""
    x, y = dataset(n=12, classes=4)
    mod.forward_backward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
    return [
        mod.get_outputs(),
        mod.get_outputs(merge_multi_context=False),
        mod.get_input_grads(),
        mod.get_input_grads(merge_multi_context=False),
    ]


@case(1, 2, 3)
def outputs_and_input_grads_on_each_workers_context(lib, record):
    record(every_result, bound_mlp(lib, inputs_need_grad=True))


def two_stage_mlp():
    """The input layer in group "stage1", the output layer in "stage2"."""
    with mx.AttrScope(ctx_group="stage1"):
        net = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=8, name="fc0")
        net = mx.sym.Activation(net, act_type="relu")
    with mx.AttrScope(ctx_group="stage2"):
        net = mx.sym.FullyConnected(net, num_hidden=4, name="fc1")
        return mx.sym.SoftmaxOutput(net, name="softmax")


@case(1, 2)
def group2ctxs_arrays_come_back_on_their_groups_context(lib, record):
    mod = lib.Module(two_stage_mlp(), group2ctxs={"stage1": mx.cpu(1), "stage2": mx.cpu(2)})
    mod.bind(*SHAPES, inputs_need_grad=True)
    mod.init_params()
    record(every_result, mod)


@case(1, 2)
def states_per_worker_on_each_workers_context(lib, record):
    data, state = mx.sym.Variable("data"), mx.sym.Variable("state")
    symbol = mx.sym.elemwise_add(data, state, name="sum")
    mod = lib.Module(symbol, label_names=None, state_names=["state"])
    mod.bind([("data", (4, 3))], None, for_training=False)
    mod.init_params()
    mod.set_states(value=2.0)
    record(mod.get_states, merge_multi_context=False)  # MXNet cannot merge states yet
    n = len(lib.contexts)
    mod.set_states(states=[[mx.nd.ones((4 // n, 3)) * i for i in range(n)]])
    record(mod.get_states, merge_multi_context=False)
    mod.forward(mx.io.DataBatch([mx.nd.ones((4, 3))]))
    record(mod.get_outputs)


@case(2)
def bucketing_set_params_checks_names_as_mxnet_does(lib, record):
    """MXNet's BucketingModule drops allow_extra on the allow_missing=False path."""
    mod = lib.BucketingModule(lstm_sym_gen, default_bucket_key=8)
    mod.bind([("data", (12, 8))], [("softmax_label", (12, 8))])
    mod.init_params()
    arg, aux = mod.get_params()
    arg = {k: v + 1 for k, v in arg.items()}
    extra = {"extra_weight": mx.nd.ones((2,))}
    record.exact(mod.set_params, {**arg, **extra}, aux, allow_extra=True)
    record.exact(mod.set_params, {**arg, **extra}, aux, allow_missing=True)
    record(mod.set_params, {**arg, **extra}, aux, allow_missing=True, allow_extra=True)
    record(lambda: mod.get_params()[0])
    mod.forward(batches([8], batch_size=12)[0], is_train=False)
    record(mod.get_outputs)


def train_steps(mod, steps=2):
    for seed in range(steps):
        x, y = dataset(n=12, seed=seed)
        mod.forward_backward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
        mod.update()
    return mod.get_params()[0]


@case(1, 2, 3)
def training_steps_with_grad_req_and_fixed_params(lib, record):
    for grad_req in ("write", "add"):
        mod = lib.Module(mlp(), fixed_param_names=["fc0_weight"])
        mod.bind(*SHAPES, grad_req=grad_req)
        mod.init_params()
        mod.init_optimizer(optimizer_params=SGD)
        record(train_steps, mod)
        lib.done(mod)


@case(2)
def force_init_and_force_rebind(lib, record):
    mod = bound_mlp(lib)
    mod.init_optimizer(optimizer_params=SGD)
    record(mod.init_params, mx.init.Zero())  # warns and is ignored
    record(mod.init_params, mx.init.Constant(0.5), force_init=True)
    record(forward_outputs, mod)
    record(mod.bind, *SHAPES)  # already bound: logged and ignored
    record(mod.bind, [("data", (6, 20))], [("softmax_label", (6,))], force_rebind=True)
    record(shapes, mod)
    record(forward_outputs, mod, n=6)
    record(lambda: (mod.params_initialized, mod.optimizer_initialized))


@case(2)
def a_shared_module_uses_the_first_modules_parameters_and_optimizer(lib, record):
    first = bound_mlp(lib)
    first.init_optimizer(optimizer_params=SGD)
    second = lib.Module(mlp())
    second.bind([("data", (6, 20))], [("softmax_label", (6,))], shared_module=first)
    record(lambda: (second.params_initialized, second.optimizer_initialized))
    record(train_steps, first, 1)
    record(forward_outputs, second, 6)
    record(train_steps, second, 1)
    record(lambda: first.get_params()[0])


def private_state(mod):
    """What MXNet's private attributes show after a training forward-backward."""
    group = mod._exec_group
    return [
        [dict(e.arg_dict) for e in group.execs],
        [dict(e.grad_dict) for e in group.execs],
        [dict(e.aux_dict) for e in group.execs],
        [e.outputs for e in group.execs],
        group.param_arrays,
        group.grad_arrays,
        group.grad_req,
        group.slices,
        group.batch_size,
        mod._total_exec_bytes,
    ]


@case(1, 2, 3)
def private_state_reads_as_mxnets(lib, record):
    """``_exec_group``, ``_updater``, ``_kvstore``: with MXNET_UPDATE_ON_KVSTORE=0, MXNet's
    module keeps the updater itself (as raymodule's workers do)."""
    os.environ["MXNET_UPDATE_ON_KVSTORE"] = "0"
    try:
        mod = lib.Module(mlp(), fixed_param_names=["fc0_bias"])
        record(lambda: (mod._exec_group, mod._updater, mod._kvstore, mod._update_on_kvstore))
        mod.bind(*SHAPES)
        mod.init_params()
        record(lambda: (mod._updater, mod._kvstore))
        mod.init_optimizer(optimizer_params=SGD)
        record(lambda: (mod._update_on_kvstore, getattr(mod._kvstore, "type", None)))
        train_steps(mod)
        record(lambda: mod._updater.states)
        x, y = dataset(n=12, seed=5)
        mod.forward_backward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
        record(private_state, mod)
    finally:
        del os.environ["MXNET_UPDATE_ON_KVSTORE"]


@case(2)
def bucketing_private_state_reads_as_mxnets(lib, record):
    mod = lib.BucketingModule(lstm_sym_gen, default_bucket_key=8)
    mod.bind([("data", (12, 8))], [("softmax_label", (12, 8))])
    mod.init_params()
    mod.forward_backward(batches([5], batch_size=12)[0])
    record(lambda: [e.outputs for e in mod._curr_module._exec_group.execs])
    record(lambda: [dict(e.grad_dict) for e in mod._buckets[8]._exec_group.execs])


def test_the_private_state_views_refuse_writes_in_words():
    mod = raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)])
    try:
        mod.bind(*SHAPES)
        mod.init_params()
        mod.init_optimizer(kvstore="local", optimizer_params=SGD)
        with pytest.raises(AttributeError, match="read-only.*set_params"):
            mod._exec_group.execs = []
        with pytest.raises(TypeError):
            mod._exec_group.execs[0].arg_dict["fc0_weight"] = mx.nd.zeros((8, 20))
        with pytest.raises(AttributeError, match="read-only.*init_optimizer"):
            mod._updater.states = {}
        with pytest.raises(AttributeError, match="read-only"):
            del mod._exec_group.execs
        assert mod._kvstore.type == "local" and not mod._update_on_kvstore
        with pytest.raises(AttributeError, match="read-only"):
            mod._total_exec_bytes = 5
    finally:
        mod.close()


@case(1, 2, 3)
def grad_req_null_leaves_the_parameters_where_they_are(lib, record):
    mod = lib.Module(mlp())
    mod.bind(*SHAPES, grad_req="null")
    mod.init_params()
    mod.init_optimizer(optimizer_params=SGD)
    record(train_steps, mod)
    record(lambda: mod._exec_group.grad_req)


@case(1, 2, 3)
def monitor_update_metric_and_prepare(lib, record):
    mod = bound_mlp(lib)
    mod.init_optimizer(optimizer_params=SGD)
    monitor = mx.mon.Monitor(1, pattern=".*weight", sort=True)
    mod.install_monitor(monitor)
    x, y = dataset(n=12, seed=3)
    batch = mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)])
    record(mod.prepare, batch)
    monitor.tic()
    mod.forward_backward(batch)
    record(monitor.toc)
    metric = mx.metric.create(["acc", "ce"])
    record(mod.update_metric, metric, batch.label)
    record(metric.get_name_value)


@case(1, 2, 3)
def iter_predict_gives_each_batchs_outputs(lib, record):
    mod = bound_mlp(lib)
    it = mx.io.NDArrayIter(*dataset(n=30, seed=4), batch_size=12)  # the last batch padded
    # copied as they come: MXNet's, on one device, are views of the executor's outputs
    record(lambda: [([o.copy() for o in outs], n) for outs, n, _ in mod.iter_predict(it)])
    record(lambda: [(outs, n) for outs, n, _ in mod.iter_predict(it, num_batch=1, reset=True)])


@case(2)
def load_dict_builds_the_buckets_with_the_parameters_given(lib, record):
    first = lib.BucketingModule(lstm_sym_gen, default_bucket_key=8)
    first.bind([("data", (12, 8))], [("softmax_label", (12, 8))])
    first.init_params()
    arg, aux = first.get_params()
    symbols = {8: lstm_sym_gen(8)[0], 5: lstm_sym_gen(5)[0]}
    mod = lib._made(
        lib.package.BucketingModule.load_dict(
            symbols, lstm_sym_gen, 8, arg, aux, context=lib.contexts
        )
    )
    mod.bind([("data", (12, 8))], [("softmax_label", (12, 8))])
    record(lambda: sorted(mod._buckets))
    for data_batch in batches([8, 5], batch_size=12):
        mod.forward(data_batch, is_train=False)
        record(mod.get_outputs)


@case(1, 2, 3)
def fit_an_embedding_with_sparse_gradients(lib, record):
    rng = np.random.RandomState(0)
    ids, y = rng.randint(0, 20, (48, 3)).astype("float32"), rng.randint(0, 4, 48)
    emb = mx.sym.Embedding(
        mx.sym.Variable("data"), input_dim=40, output_dim=6, sparse_grad=True, name="emb"
    )
    net = mx.sym.FullyConnected(mx.sym.flatten(emb), num_hidden=4, name="fc")
    mod = lib.Module(mx.sym.SoftmaxOutput(net, name="softmax"))
    it = mx.io.NDArrayIter(ids, y.astype("float32"), batch_size=12)
    mod.fit(it, num_epoch=2, optimizer_params=SGD, initializer=mx.init.Xavier())
    record(lambda: mod.get_params()[0])
    record(lambda: sorted((k, v.stype) for k, v in mod.get_params()[0].items()))


@case(1, 2)  # two modules at once: 3 workers each would not fit the session's 4 CPUs
def checkpoints_params_and_optimizer_states_saved_and_loaded(lib, record):
    """Each implementation reads back what it wrote, and training goes on as MXNet's does."""
    with tempfile.TemporaryDirectory(prefix="rmf-") as folder:
        prefix = os.path.join(folder, "mlp")
        mod = bound_mlp(lib)
        mod.init_optimizer(optimizer_params=SGD)
        train_steps(mod)
        record(mod.save_checkpoint, prefix, 3, save_optimizer_states=True)
        record(lambda: sorted(os.listdir(folder)))
        loaded = lib._made(
            lib.package.Module.load(prefix, 3, load_optimizer_states=True, context=lib.contexts)
        )
        loaded.bind(*SHAPES)
        loaded.init_optimizer(optimizer_params=SGD)
        record(train_steps, loaded)  # momentum restored: as the module that went on
        record(train_steps, mod)
        lib.done(mod)
        lib.done(loaded)
        other = bound_mlp(lib)
        record(other.load_params, prefix + "-0003.params")
        record(lambda: other.get_params()[0])
        other.init_optimizer(optimizer_params=SGD)
        record(other.load_optimizer_states, prefix + "-0003.states")
        record(train_steps, other)
        record(other.save_params, prefix + ".params")
        record(lambda: sorted(mx.nd.load(prefix + ".params")))
