"""Row-sparse gradients: summed as rows across workers, updated lazily as on one MXNet device."""

from __future__ import annotations

import os
import sys

import mxnet as mx
import numpy as np
import pytest
import ray
from conftest import Interrupted, interrupt_at, max_relative_diff
from shm_ranks import form

import raymodule
from raymodule.worker.collective import Collective, free_address
from raymodule.worker.process_group import sum_rows

ROWS, WIDTH, IDS, BATCH = 40, 6, 3, 12
OPTIMIZERS = [
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4}),
    ("adam", {"learning_rate": 0.01}),
]


def sparse_net():
    """The three ways MXNet 1.9 makes row-sparse gradients on CPU, in one model:
    ``Embedding(sparse_grad=True)`` over a dense weight and over a ``stype='row_sparse'`` weight
    (both reading ``ids``), and MXNet's sparse linear model (example/sparse), ``dot(csr
    feats, row_sparse weight)``."""
    ids = mx.sym.Variable("ids")
    feats = mx.sym.Variable("feats", stype="csr")
    dense = mx.sym.Embedding(ids, input_dim=ROWS, output_dim=WIDTH, sparse_grad=True, name="emb")
    sparse = mx.sym.Embedding(
        ids,
        weight=mx.sym.Variable("rsp_emb_weight", stype="row_sparse"),
        input_dim=ROWS,
        output_dim=WIDTH,
        sparse_grad=True,
        name="rsp_emb",
    )
    linear = mx.sym.sparse.dot(
        feats, mx.sym.Variable("linear_weight", shape=(ROWS, 4), stype="row_sparse")
    )
    net = mx.sym.FullyConnected(mx.sym.flatten(dense + sparse), num_hidden=4, name="fc") + linear
    return mx.sym.SoftmaxOutput(net, name="softmax")


def batches(steps: int) -> list[mx.io.DataBatch]:
    """Ids drawn from half the rows (rows repeat within and across workers' slices), csr
    features with 10% of their entries set, and labels."""
    rng = np.random.RandomState(0)
    out = []
    for _ in range(steps):
        feats = rng.uniform(-1, 1, (BATCH, ROWS)) * (rng.uniform(size=(BATCH, ROWS)) < 0.1)
        out.append(
            mx.io.DataBatch(
                [
                    mx.nd.array(rng.randint(0, ROWS // 2, (BATCH, IDS))),
                    mx.nd.array(feats).tostype("csr"),
                ],
                [mx.nd.array(rng.randint(0, 4, BATCH))],
            )
        )
    return out


def train(mod, steps=4) -> list[dict]:
    """Trains from the same Xavier draw under each optimizer in turn; returns the final
    parameters of each."""
    mod.bind([("ids", (BATCH, IDS)), ("feats", (BATCH, ROWS))], [("softmax_label", (BATCH,))])
    finals = []
    for optimizer, optimizer_params in OPTIMIZERS:
        mx.random.seed(5)
        mod.init_params(mx.init.Xavier(), force_init=True)
        mod.init_optimizer(optimizer=optimizer, optimizer_params=optimizer_params, force_init=True)
        for batch in batches(steps):
            mod.forward_backward(batch)
            mod.update()
        arg, _ = mod.get_params()
        finals.append({k: v.copy() for k, v in arg.items()})
    return finals


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_sparse_gradients_train_as_on_one_mxnet_device(workers):
    symbol = sparse_net()
    reference = mx.mod.Module(symbol, data_names=["ids", "feats"])
    native = train(reference)
    group = reference._exec_group
    assert [n for n, g in zip(group.param_names, group.grad_arrays) if g[0].stype != "default"] == [
        "emb_weight", "rsp_emb_weight", "linear_weight",
    ]  # fmt: skip
    with raymodule.Module(
        symbol, data_names=["ids", "feats"], context=[mx.cpu(i) for i in range(workers)]
    ) as mod:
        distributed = train(mod)
    for expected, actual in zip(native, distributed):
        assert max_relative_diff(expected, actual) <= 1e-5
        for name, value in expected.items():  # the client's copies are MXNet's, stype and rows
            assert actual[name].stype == value.stype, name
            if value.stype == "row_sparse":
                np.testing.assert_array_equal(
                    actual[name].indices.asnumpy(), value.indices.asnumpy()
                )


def test_sum_rows_adds_rows_of_one_id_in_rank_order():
    ids, rows = sum_rows(
        [np.array([1, 4]), np.array([], np.int64), np.array([0, 4])],
        [np.ones((2, 3), "f"), np.zeros((0, 3), "f"), np.full((2, 3), 2, "f")],
    )
    np.testing.assert_array_equal(ids, [0, 1, 4])
    np.testing.assert_array_equal(rows, [[2] * 3, [1] * 3, [3] * 3])


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


@ray.remote(num_cpus=0)
class Rank:
    """One rank of a real gloo group, reducing arrays as a worker's update does."""

    def __init__(self):
        self.collective = None

    def address(self) -> str:
        return free_address()

    def pid(self) -> int:
        return os.getpid()

    def join(self, world_size: int, rank: int, rendezvous) -> None:
        self.collective = Collective(world_size, rank, rendezvous, "gloo", 60)

    def reduce(self, ids, rows, shape, dense) -> tuple:
        grad = mx.nd.sparse.row_sparse_array((rows, ids), shape=shape)
        other = mx.nd.array(dense)
        sent = self.collective.reduce([other, grad], 1 << 20)
        return grad.stype, grad.indices.asnumpy(), grad.asnumpy(), other.asnumpy(), sent

    def close(self) -> None:
        self.collective.close()


@pytest.mark.parametrize("same_node", [False, True], ids=["store", "same-node"])
def test_row_sparse_gradients_are_gathered_as_rows_on_a_real_group(same_node):
    """At rank 0's store; or met in shared memory, where the group makes its process group
    (torch) at its first row-sparse sum, rank 0 handing its port over in shared memory."""
    ranks = [Rank.remote(), Rank.remote()]
    try:
        form(ranks, same_node)
        shape = (1000, 4)
        parts = [  # per step, each rank's (ids, rows): a row both touch; a rank touching none
            [
                (np.array([3, 7, 9]), np.arange(12, dtype="f").reshape(3, 4)),
                (np.array([7]), np.full((1, 4), 10, "f")),
            ],
            [
                (np.array([5]), np.ones((1, 4), "f")),
                (np.array([], np.int64), np.zeros((0, 4), "f")),
            ],
        ]
        dense = np.arange(8, dtype="f")
        for step in parts:
            results = ray.get(
                [r.reduce.remote(*p, shape, dense) for r, p in zip(ranks, step)], timeout=120
            )
            expected = sum(
                mx.nd.sparse.row_sparse_array((rows, ids), shape=shape).asnumpy()
                for ids, rows in step
            )
            touched = np.unique(np.concatenate([ids for ids, _ in step]))
            for stype, ids, summed, other, sent in results:
                assert stype == "row_sparse"
                np.testing.assert_array_equal(ids, touched)
                np.testing.assert_array_equal(summed, expected)
                np.testing.assert_array_equal(other, 2 * dense)
                # the dense array, the counts, and ids + rows padded to the most rows a rank has
                longest = max(len(ids) for ids, _ in step)
                assert sent == dense.nbytes + 8 + longest * (8 + 4 * 4)
            assert results[0][2].tobytes() == results[1][2].tobytes()
    finally:
        ray.get([r.close.remote() for r in ranks], timeout=60)
        for r in ranks:
            ray.kill(r)


def fit(mod, num_epoch=2, **fit_args) -> dict:
    """Fits the sparse model from seed 5 with SGD momentum on 6 batches an epoch."""
    steps = batches(6)
    data = {
        "ids": mx.nd.concat(*(b.data[0] for b in steps), dim=0),
        "feats": mx.nd.sparse.concat(*(b.data[1] for b in steps), dim=0),
    }
    label = mx.nd.concat(*(b.label[0] for b in steps), dim=0)
    it = mx.io.NDArrayIter(data, label, batch_size=BATCH, last_batch_handle="discard")
    mx.random.seed(5)
    mod.fit(
        it,
        num_epoch=num_epoch,
        optimizer=OPTIMIZERS[0][0],
        optimizer_params=OPTIMIZERS[0][1],
        initializer=mx.init.Xavier(),
        **fit_args,
    )
    return mod.get_params()[0]


def test_a_run_with_row_sparse_weights_resumes_and_plain_mxnet_loads_it(tmp_path):
    """Run checkpoints hold the row_sparse weights and optimizer states (momentum of row_sparse
    weights is row_sparse too); a resumed run ends where one MXNet device does."""
    symbol, names = sparse_net(), ["ids", "feats"]
    native = fit(mx.mod.Module(symbol, data_names=names))
    config = raymodule.RunConfig(name="sparse", storage=str(tmp_path), checkpoint_every=2)
    stop = interrupt_at(1, 1, str(tmp_path / "sparse"))
    with raymodule.Module(symbol, data_names=names, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        with pytest.raises(Interrupted):
            fit(mod, run=config, batch_end_callback=stop)
    assert raymodule.latest_checkpoint(str(tmp_path / "sparse")).epoch == 1
    with raymodule.Module(symbol, data_names=names, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        resumed = fit(mod, run=config)
    assert max_relative_diff(native, resumed) <= 1e-5

    ckpt = raymodule.latest_checkpoint(str(tmp_path / "sparse"))
    loaded = mx.mod.Module.load(ckpt.prefix, ckpt.epoch, data_names=names)
    loaded.bind(
        [("ids", (BATCH, IDS)), ("feats", (BATCH, ROWS))],
        [("softmax_label", (BATCH,))],
        for_training=False,
    )
    held = loaded.get_params()[0]
    assert held["linear_weight"].stype == "row_sparse"
    assert max_relative_diff(resumed, held) == 0.0
