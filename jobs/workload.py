"""The work jobs/benchmark.py and the jobs beside it time: its models (see its docstring:
mlp, lenet, cnn and the bucketing lstm), their global batches and synthetic data, the iterators
each worker reads its part of a batch from, and the environment every measuring process runs
under (one thread for MXNet's operators and one for its CPU engine; Ray on loopback).

It imports neither MXNet nor Ray when it is imported (the functions take ``mx``; a
DatasetIter's data and the lstm's corpus import them when asked for), so a job sets THREAD_ENV
and RAY_ENV from here before either starts.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

MODELS = {"mlp": 128, "lenet": 64, "cnn": 64, "lstm": 32}  # model -> global batch size
SHAPES = {"mlp": (784,), "lenet": (1, 28, 28), "cnn": (3, 32, 32)}  # -> one sample's shape
LSTM = {"vocab_size": 2000, "num_embed": 64, "num_hidden": 128, "num_layers": 1}
LSTM_SEED = 0  # of the corpus split and of the batch order
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1"}
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GLOO_SOCKET_IFNAME": "lo",
}


def add_model_option(parser) -> None:
    """``--model``, one of the models above with a sample shape (all but lstm): for the jobs
    that time one of them (step_phases, update_kernels, shared_weights)."""
    parser.add_argument(
        "--model",
        default="mlp",
        choices=list(SHAPES),
        help="one of jobs/benchmark.py's models (default %(default)s)",
    )


def build_symbol(mx, model):
    x = mx.sym.Variable("data")
    if model == "mlp":
        for i, width in enumerate([512, 512]):
            x = mx.sym.Activation(
                mx.sym.FullyConnected(x, num_hidden=width, name=f"fc{i}"), act_type="relu"
            )
    elif model == "cnn":
        for i, filters in enumerate([32, 64]):
            x = mx.sym.Convolution(x, kernel=(3, 3), num_filter=filters, name=f"conv{i}")
            x = mx.sym.Pooling(
                mx.sym.Activation(x, act_type="relu"), pool_type="max", kernel=(2, 2), stride=(2, 2)
            )
        x = mx.sym.flatten(x)
    else:
        for i, filters in enumerate([20, 50]):
            x = mx.sym.Convolution(x, kernel=(5, 5), num_filter=filters, name=f"conv{i}")
            x = mx.sym.Pooling(
                mx.sym.Activation(x, act_type="tanh"), pool_type="max", kernel=(2, 2), stride=(2, 2)
            )
        x = mx.sym.Activation(
            mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=500, name="fc0"), act_type="tanh"
        )
    x = mx.sym.FullyConnected(x, num_hidden=10, name="out")
    return mx.sym.SoftmaxOutput(x, name="softmax")


@functools.cache
def bucketing_job():
    """jobs/bucketing.py, for its corpus, model and iterator (it imports mxnet and raymodule:
    only after THREAD_ENV, and RAY_ENV where Ray runs, are set)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bucketing

    return bucketing


@functools.cache
def lstm_sentences():
    """The lstm model's training sentences and vocabulary size."""
    train, _, vocab = bucketing_job().load_corpus(LSTM["vocab_size"], LSTM_SEED)
    return train, len(vocab)


def lstm_sym_gen():
    """The lstm model's sym_gen: bucket key (sentence length) -> (symbol, data and label names)."""
    vocab_size = lstm_sentences()[1]
    return bucketing_job().lstm_sym_gen(
        vocab_size, LSTM["num_embed"], LSTM["num_hidden"], LSTM["num_layers"]
    )


def new_module(mx, api, model, context):
    """`model`'s module from `api`, mx.mod or raymodule: a Module, or for lstm a
    BucketingModule whose default bucket is the largest."""
    if model != "lstm":
        return api.Module(build_symbol(mx, model), context=context)
    key = max(bucketing_job().BUCKETS)
    return api.BucketingModule(lstm_sym_gen(), default_bucket_key=key, context=context)


def gradient_size(mx, model):
    """Number of elements of `model`'s gradient: its parameters, without data and label."""
    batch = MODELS[model]
    if model == "lstm":
        key = max(bucketing_job().BUCKETS)
        sym = lstm_sym_gen()(key)[0]
        shapes = {"data": (batch, key), "softmax_label": (batch, key)}
    else:
        sym = build_symbol(mx, model)
        shapes = {"data": (batch,) + SHAPES[model]}
    arg_shapes, _, _ = sym.infer_shape(**shapes)
    inputs = {"data", "softmax_label"}
    names = sym.list_arguments()
    return sum(int(np.prod(s)) for n, s in zip(names, arg_shapes, strict=True) if n not in inputs)


def make_iter(mx, model, n_batches, n_epochs, rank=0, parts=1, dataset=False, client=False):
    """n_epochs of n_batches global batches, of which this worker gets part `rank`: for mlp,
    lenet and cnn, the same synthetic batches every epoch, held in memory, from an
    mx.io.NDArrayIter (with `client`, a subclass of it), or with `dataset` from a
    raymodule.data.DatasetIter over an ArrayDataset of the same samples in the same order
    (no shuffle: like for like); for lstm, see make_lstm_iter."""
    if model == "lstm":
        return make_lstm_iter(mx, n_batches, n_epochs, rank, parts)
    batch, shape = MODELS[model], SHAPES[model]
    rng = np.random.RandomState(0)
    data = rng.uniform(-1, 1, (n_batches, batch) + shape).astype(np.float32)
    label = rng.randint(0, 10, (n_batches, batch)).astype(np.float32)
    if dataset:  # whole global batches: under raymodule the workers read their own rows
        from raymodule.data import ArrayDataset, DatasetIter

        samples = ArrayDataset(data.reshape((-1,) + shape), label.reshape(-1))
        return DatasetIter(samples, batch, label_name="softmax_label")
    part = batch // parts
    rows = slice(rank * part, (rank + 1) * part)
    kind = mx.io.NDArrayIter
    if client:

        class ClientIter(mx.io.NDArrayIter):
            """raymodule reads a subclass in the client, as any DataIter: only a plain
            NDArrayIter is read as rows."""

        kind = ClientIter
    return kind(
        data[:, rows].reshape((-1,) + shape),
        label[:, rows].reshape(-1),
        batch_size=part,
        label_name="softmax_label",
    )


def make_lstm_iter(mx, n_batches, n_epochs, rank=0, parts=1):
    """The lstm model's data: n_epochs of n_batches bucketed global batches, the next ones of
    jobs/bucketing.py's SentenceIter every epoch (it is reset whenever it runs out), so that
    the timed batches mix the buckets as training does. All of them are made up front, the
    same on every worker, which gets part `rank` of each."""
    job = bucketing_job()
    batch = MODELS["lstm"]
    part = batch // parts
    rows = slice(rank * part, (rank + 1) * part)
    source = job.SentenceIter(lstm_sentences()[0], batch, job.BUCKETS, seed=LSTM_SEED)

    def descs(key):  # (provide_data, provide_label) of this worker's part of a batch
        shape = (part, key)
        return [[mx.io.DataDesc(name, shape, layout="NT")] for name in ("data", "softmax_label")]

    def my_part(b):
        data, label = descs(b.bucket_key)
        return mx.io.DataBatch(
            [b.data[0][rows].copy()],
            [b.label[0][rows].copy()],
            pad=0,
            bucket_key=b.bucket_key,
            provide_data=data,
            provide_label=label,
        )

    total, batches = n_batches * n_epochs, []
    while len(batches) < total:
        batches += [my_part(b) for b in source][: total - len(batches)]
        source.reset()

    class Batches(mx.io.DataIter):
        """Epoch e yields batches[e * n_batches:(e + 1) * n_batches]; reset() starts the next."""

        def __init__(self):
            super().__init__(part)
            self.provide_data, self.provide_label = descs(max(job.BUCKETS))  # for bind
            self.epoch, self.cursor = 0, 0

        def reset(self):
            self.epoch, self.cursor = (self.epoch + 1) % n_epochs, 0

        def next(self):
            if self.cursor == n_batches:
                raise StopIteration
            self.cursor += 1
            return batches[self.epoch * n_batches + self.cursor - 1]

    return Batches()
