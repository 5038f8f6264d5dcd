"""N workers on a global batch train the same model as one MXNet device on that batch."""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
import stepfaults
from conftest import dataset, lenet, max_relative_diff, mlp

import raymodule
import raymodule.module

SGD = {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4}


def initial_params(symbol, data_shape, batch):
    """Deterministic initial parameters, shared by the native and the distributed module."""
    mx.random.seed(7)
    mod = mx.mod.Module(symbol)
    mod.bind([("data", (batch,) + data_shape)], [("softmax_label", (batch,))])
    mod.init_params(mx.init.Xavier(magnitude=2.0))
    arg, aux = mod.get_params()
    return {k: v.copy() for k, v in arg.items()}, {k: v.copy() for k, v in aux.items()}


def train_by_steps(mod, symbol, x, y, batch, params, steps):
    """MXNet's intermediate API: bind, init, then forward_backward/update per batch."""
    mod.bind([("data", (batch,) + x.shape[1:])], [("softmax_label", (batch,))])
    mod.init_params(arg_params=params[0], aux_params=params[1])
    mod.init_optimizer(optimizer="sgd", optimizer_params=SGD)
    outputs = []
    for step in range(steps):
        lo = (step * batch) % len(x)
        db = mx.io.DataBatch([mx.nd.array(x[lo : lo + batch])], [mx.nd.array(y[lo : lo + batch])])
        mod.forward_backward(db)
        mod.update()
        outputs.append(mod.get_outputs()[0].asnumpy())
    return mod.get_params()[0], outputs


@pytest.mark.parametrize(
    "contexts, work_load_list, bucket_bytes",
    [(2, None, None), (3, [1, 1, 2], None), (2, None, 600)],
    ids=["2-even", "3-weighted-1-1-2", "2-many-small-buckets"],
)
def test_steps_match_native_mxnet(contexts, work_load_list, bucket_bytes, monkeypatch):
    if bucket_bytes:  # every array its own bucket or several per bucket: same sums
        monkeypatch.setenv("RAYMODULE_ALLREDUCE_BUCKET_BYTES", str(bucket_bytes))
    x, y = dataset(n=240)
    symbol, batch = mlp(), 24
    params = initial_params(symbol, x.shape[1:], batch)
    native_params, native_out = train_by_steps(
        mx.mod.Module(symbol), symbol, x, y, batch, params, steps=12
    )
    with raymodule.Module(
        symbol, context=[mx.cpu(i) for i in range(contexts)], work_load_list=work_load_list
    ) as mod:
        ray_params, ray_out = train_by_steps(mod, symbol, x, y, batch, params, steps=12)
    assert max_relative_diff(native_params, ray_params) < 1e-5
    for expected, actual in zip(native_out, ray_out):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "symbol_fn, shape", [(mlp, (20,)), (lenet, (1, 12, 12))], ids=["mlp", "lenet"]
)
def test_fit_matches_native_mxnet(symbol_fn, shape):
    x, y = dataset(n=120, shape=shape)
    symbol = symbol_fn()

    def fit(mod):
        mx.random.seed(3)
        it = mx.io.NDArrayIter(x, y, batch_size=20)
        metric = mx.metric.Accuracy()
        mod.fit(
            it,
            eval_metric=metric,
            num_epoch=2,
            optimizer="sgd",
            optimizer_params=SGD,
            initializer=mx.init.Xavier(),
        )
        it.reset()
        return mod.get_params()[0], metric.get(), mod.predict(it).asnumpy()

    native_params, native_metric, native_pred = fit(mx.mod.Module(symbol))
    with raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        ray_params, ray_metric, ray_pred = fit(mod)
    assert max_relative_diff(native_params, ray_params) < 1e-5
    assert ray_metric == native_metric
    np.testing.assert_allclose(ray_pred, native_pred, rtol=1e-4, atol=1e-6)


def test_every_kvstore_name_trains_the_same_model():
    x, y = dataset(n=96)
    symbol, batch = mlp(), 24
    params = initial_params(symbol, x.shape[1:], batch)
    db = mx.io.DataBatch([mx.nd.array(x[:batch])], [mx.nd.array(y[:batch])])
    results = []
    with raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.bind([("data", (batch, 20))], [("softmax_label", (batch,))])
        for kvstore in raymodule.module.SUPPORTED_KVSTORES + (None,):
            mod.init_params(arg_params=params[0], aux_params=params[1], force_init=True)
            mod.init_optimizer(
                kvstore=kvstore, optimizer="sgd", optimizer_params=SGD, force_init=True
            )
            # MXNet would divide by num_workers for dist*_sync names; the batch is global here.
            assert mod._optimizer.rescale_grad == pytest.approx(1 / batch)
            for _ in range(3):
                mod.forward_backward(db)
                mod.update()
            results.append({k: v.copy() for k, v in mod.get_params()[0].items()})
    for other in results[1:]:
        assert max_relative_diff(results[0], other) < 1e-6


def test_fixed_params_stay_fixed_and_are_not_reduced():
    x, y = dataset(n=48)
    symbol, batch = mlp(), 24
    params = initial_params(symbol, x.shape[1:], batch)
    fixed = ["fc0_weight", "fc0_bias"]
    results = []
    for mod in (
        mx.mod.Module(symbol, fixed_param_names=fixed),
        raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)], fixed_param_names=fixed),
    ):
        final, _ = train_by_steps(mod, symbol, x, y, batch, params, steps=4)
        results.append(final)
    for name in fixed:
        np.testing.assert_array_equal(results[1][name].asnumpy(), params[0][name].asnumpy())
    assert max_relative_diff(results[0], results[1]) < 1e-5


@pytest.mark.parametrize(
    "options",
    [SGD, dict(SGD, clip_gradient=0.5), {"learning_rate": 0.1}, {"learning_rate": 0.1, "wd": 0.01}],
    ids=["momentum-wd", "clipped", "plain", "decay-only"],
)
def test_one_worker_trains_bit_for_bit_as_native_mxnet(options):
    """One worker takes the steps of one MXNet device: the same parameters to the bit. The
    worker updates each parameter with its own kernel, where MXNet groups them in its
    multi-tensor SGD update (raymodule.worker.native.update_per_parameter)."""
    x, y = dataset(n=240)
    symbol, batch = mlp(), 24
    params = initial_params(symbol, x.shape[1:], batch)

    def train(mod):
        mod.bind([("data", (batch,) + x.shape[1:])], [("softmax_label", (batch,))])
        mod.init_params(arg_params=params[0], aux_params=params[1])
        mod.init_optimizer(optimizer="sgd", optimizer_params=options)
        for step in range(10):
            rows = slice(step * batch, (step + 1) * batch)
            mod.forward_backward(mx.io.DataBatch([mx.nd.array(x[rows])], [mx.nd.array(y[rows])]))
            mod.update()
        return mod.get_params()[0]

    native = train(mx.mod.Module(symbol))
    assert len(native) > 4  # more than MXNet's default group of 4
    with raymodule.Module(symbol, context=[mx.cpu(0)]) as mod:
        ours = train(mod)
    for name, array in native.items():
        np.testing.assert_array_equal(ours[name].asnumpy(), array.asnumpy(), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_workers_sgd_update_gives_the_bits_of_mxnets_own_update(dtype):
    """The update a worker makes of one array, against MXNet's SGD.update (its multi-tensor
    kernel), over random arrays, rates, decays, momenta (a negative one too, whose state MXNet
    makes and leaves alone), scales and clips (a negative one, which MXNet's kernel ignores):
    the same weights and momentum to the bit, step after step. With momentum, the worker's
    numpy arithmetic on the arrays' memory, a chunk at a time, whose scalars must be read as
    MXNet's parser reads them (rates drawn at random include some that numpy rounds to
    another float32); without, MXNet's kernel for one array."""
    from raymodule.worker import native

    rng = np.random.default_rng(3)
    for trial in range(36):
        options = {
            "learning_rate": float(rng.choice([0.1, 0.0123, 1.7e-3, rng.uniform(1e-4, 1)])),
            "wd": float(rng.choice([0.0, 1e-4, 0.01, rng.uniform(0, 0.01)])),
            "momentum": float(rng.choice([0.0, 0.5, 0.9, 0.99, -0.5, rng.uniform(0.01, 1)])),
            "rescale_grad": float(rng.choice([1 / 128, 1 / 3, 1.0, rng.uniform(1e-3, 2)])),
        }
        if trial % 3 == 0:
            options["clip_gradient"] = float(rng.choice([0.01, 1.0, -1.0, rng.uniform(0.1, 5)]))
        size = int(rng.integers(1, 200_000))  # the host update goes by 65,536 at a time
        start = [rng.standard_normal(size).astype(dtype) * scale for scale in (1.0, 10.0, 0.1)]
        results = []
        for ours in (False, True):
            optimizer = mx.optimizer.SGD(**options)
            weight, grad, mom = (mx.nd.array(a, dtype=dtype) for a in start)
            state = optimizer.create_state(0, weight)
            if state is not None:
                state[:] = mom
            host = ours and state is not None and optimizer.momentum > 0
            if host:  # numpy arrays, as the worker's views of its arrays
                weight, grad, state = (a.asnumpy() for a in (weight, grad, state))
            for _ in range(3):
                lr, wd = optimizer._get_lrs([0])[0], optimizer._get_wds([0])[0]
                if host:
                    native._sgd_mom_on_host(optimizer, weight, grad, state, lr, wd)
                elif ours:
                    native._sgd_kernel(optimizer, weight, grad, lr, wd)
                else:
                    optimizer.update(0, weight, grad, state)
            results.append(
                [
                    a if isinstance(a, np.ndarray) else a.asnumpy()
                    for a in (weight, state)
                    if a is not None
                ]
            )
        for mxnets, workers in zip(*results):
            np.testing.assert_array_equal(workers, mxnets, err_msg=str(options))


@pytest.mark.parametrize("workers", [2, 3])
def test_an_update_split_or_reading_shared_sums_gives_the_bits_of_each_updating_its_own(
    workers, tmp_path, monkeypatch
):
    """The workers of one node each update their part of the parameters and momentum and
    share the parts (RAYMODULE_SPLIT_UPDATE=1; off by default); or each updates all of them
    from the gradient sums where they were summed, in the node's shared memory (the default);
    or, with buckets too small to hold the gradients in one (RAYMODULE_ALLREDUCE_BUCKET_BYTES),
    from its own copy of the sums: the parameters and the momentum equal to the bit in all
    three, through a learning-rate schedule, weight decay (not on biases) and clipping; and
    MXNet's to 1e-5."""
    x, y = dataset(n=240)
    symbol, batch = mlp(), 24
    params = initial_params(symbol, x.shape[1:], batch)

    def fit(mod, states):
        schedule = mx.lr_scheduler.FactorScheduler(step=3, factor=0.7)  # stateful: one a fit
        mod.fit(
            mx.io.NDArrayIter(x, y, batch),
            num_epoch=2,
            arg_params=params[0],
            aux_params=params[1],
            optimizer="sgd",
            optimizer_params=dict(SGD, clip_gradient=0.05, lr_scheduler=schedule),
        )
        mod.save_optimizer_states(str(states))
        return {k: v.copy() for k, v in mod.get_params()[0].items()}

    native = fit(mx.mod.Module(symbol), tmp_path / "native.states")
    results = {}
    ways = {"split": ("1", str(4 << 20)), "shared sums": ("0", str(4 << 20)), "own": ("0", "600")}
    for way, (split, bucket_bytes) in ways.items():
        marks = tmp_path / f"marks-{way}"
        marks.mkdir()
        cls = stepfaults.worker_class({}, marks=marks)
        monkeypatch.setattr(raymodule.module, "ControllerHandle", stepfaults.with_workers(cls))
        monkeypatch.setenv("RAYMODULE_SPLIT_UPDATE", split)
        monkeypatch.setenv("RAYMODULE_ALLREDUCE_BUCKET_BYTES", bucket_bytes)
        with raymodule.Module(symbol, context=[mx.cpu(i) for i in range(workers)]) as mod:
            results[way] = fit(mod, tmp_path / f"{way}.states")
        assert stepfaults.split_updates(marks) == (workers if way == "split" else 0)
        assert stepfaults.shared_sums(marks) == (workers if way == "shared sums" else 0)
    for way in ("split", "shared sums"):
        for name, value in results["own"].items():
            assert results[way][name].asnumpy().tobytes() == value.asnumpy().tobytes(), name
        states = (tmp_path / f"{way}.states").read_bytes()
        assert states == (tmp_path / "own.states").read_bytes(), way
    assert max_relative_diff(native, results["split"]) < 1e-5
