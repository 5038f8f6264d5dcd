"""raymodule.data.RecordIODataset: MXNet's indexed RecordIO read by byte ranges, locally and
from S3, trained on 2 workers as one native MXNet device trains it; bad files refused in words
in the client; the workers' reads a step ahead and bounded."""

from __future__ import annotations

import io
import pickle
import threading

import mxnet as mx
import numpy as np
import pytest
import ray
from conftest import max_relative_diff, wait_until
from PIL import Image

import raymodule
from raymodule import storage
from raymodule.data import ArrayDataset, Dataset, DatasetIter, IndexedParts, RecordIODataset

SGD = {"learning_rate": 0.05, "momentum": 0.9, "wd": 1e-4}
N = 64
SECRET = "raymodule-test-never-printed"


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_rec(folder, name="digits", payloads=None, n=N, seed=0):
    """``n`` 8x8 grayscale PNG records (label: the image's class, 0-3) written by MXNet's own
    MXIndexedRecordIO; ``payloads`` overrides some records' image bytes. Returns the paths of
    the .rec and the .idx, and the images and labels."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 4, n)
    images = (rng.randint(0, 64, (n, 8, 8)) + labels[:, None, None] * 60).astype("uint8")
    rec, idx = str(folder / f"{name}.rec"), str(folder / f"{name}.idx")
    writer = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
    for i in range(n):
        payload = (payloads or {}).get(i) or png(images[i])
        header = mx.recordio.IRHeader(0, float(labels[i]), i, 0)
        writer.write_idx(i, mx.recordio.pack(header, payload))
    writer.close()
    return rec, idx, images, labels.astype("float32")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_rec(tmp_path_factory.mktemp("rec"))


def small_cnn(classes=4):
    """A CNN over 1x8x8 pixel values (0-255), without BatchNorm or Dropout: replicas and
    MXNet agree to float rounding."""
    net = mx.sym.Variable("data") * (1 / 255)
    net = mx.sym.Convolution(net, kernel=(3, 3), num_filter=4, name="conv0")
    net = mx.sym.Activation(net, act_type="relu")
    net = mx.sym.FullyConnected(mx.sym.flatten(net), num_hidden=classes, name="out")
    return mx.sym.SoftmaxOutput(net, name="softmax")


def test_samples_are_the_records_images_and_labels(digits):
    rec, idx, images, labels = digits
    ds = RecordIODataset(rec, idx, (1, 8, 8))
    assert len(ds) == N and raymodule.RecordIODataset is RecordIODataset
    (data,), (label,) = ds.take(np.array([5, 0, 5]))
    assert data.dtype == np.float32 and data.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(data[:, 0], images[[5, 0, 5]])
    np.testing.assert_array_equal(label, labels[[5, 0, 5]])
    it = DatasetIter(ds, 16)
    assert it.provide_data == [mx.io.DataDesc("data", (16, 1, 8, 8), np.float32)]
    assert it.provide_label == [mx.io.DataDesc("softmax_label", (16,), np.float32)]
    # other shapes: resized to cover, then center-cropped, as RGB for 3 channels
    (rgb,), _ = RecordIODataset(rec, idx, (3, 4, 6)).take(np.array([1]))
    assert rgb.shape == (1, 3, 4, 6) and (rgb[:, 0] == rgb[:, 2]).all()
    # pickled, it carries its index, not records, and opens the file again where it reads
    copy = pickle.loads(pickle.dumps(ds))
    assert 8 * N < len(pickle.dumps(ds)) < 2000 + 16 * N
    np.testing.assert_array_equal(copy.take(np.array([7]))[0][0], ds.take(np.array([7]))[0][0])
    # once fit or score asked for its key, the index travels as its object-store reference
    assert ds.key() == copy.key() != RecordIODataset(rec, idx, (1, 8, 8)).key()
    assert len(pickle.dumps(ds)) < 1500

    @ray.remote
    def read(dataset, indices):  # as a worker reads: a copy reading the index once
        return dataset._offsets is None, dataset.take(indices)[0][0], dataset._offsets is None

    before, got, after = ray.get(read.remote(ds, np.array([9, 2])))
    assert before and not after
    np.testing.assert_array_equal(got, ds.take(np.array([9, 2]))[0][0])


def test_fit_on_two_workers_equals_one_native_module(digits):
    rec, idx, _, _ = digits
    ds = RecordIODataset(rec, idx, (1, 8, 8))
    symbol = small_cnn()

    def fit(mod):
        it = DatasetIter(ds, 16, shuffle=True, seed=4)
        metric = mx.metric.Accuracy()
        mx.random.seed(3)
        mod.fit(
            it,
            eval_metric=metric,
            num_epoch=2,
            optimizer="sgd",
            optimizer_params=SGD,
            initializer=mx.init.Xavier(),
        )
        return mod.get_params()[0], metric.get(), mod.score(DatasetIter(ds, 16), "acc")

    native_params, native_metric, native_score = fit(mx.mod.Module(symbol))
    with raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        ray_params, ray_metric, ray_score = fit(mod)
    assert max_relative_diff(native_params, ray_params) < 1e-5
    assert ray_metric == native_metric
    assert ray_score == native_score


def test_records_read_from_s3_equal_the_local_copys(digits, s3):
    rec, idx, _, _ = digits
    local = RecordIODataset(rec, idx, (1, 8, 8))
    for path in (rec, idx):
        with open(path, "rb") as f:
            storage.write_bytes(s3.uri("recordio/" + path.rsplit("/", 1)[1]), f.read())
    remote = RecordIODataset(
        s3.uri("recordio/digits.rec"), s3.uri("recordio/digits.idx"), (1, 8, 8)
    )
    order = np.random.default_rng(0).permutation(N)

    @ray.remote
    def read(dataset, indices):  # as a worker reads: a pickled copy opening its own file
        return dataset.take(indices)

    for got in (remote.take(order), ray.get(read.remote(remote, order))):
        for a, b in zip(got[0] + got[1], local.take(order)[0] + local.take(order)[1]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"RecordIODataset: rec: no file at 's3://.*none.rec"):
        RecordIODataset(s3.uri("recordio/none.rec"), s3.uri("recordio/digits.idx"), (1, 8, 8))
    wrong_keys = s3.uri("recordio/digits.idx") + f"&access_key=someone&secret_key={SECRET}"
    with pytest.raises(ValueError, match=r"RecordIODataset: idx: .*digits.idx") as err:
        RecordIODataset(s3.uri("recordio/digits.rec"), wrong_keys, (1, 8, 8))
    assert SECRET not in str(err.value) and "secret_key=***" in str(err.value), err.value


def decode_flipped(record: bytes):
    """A custom decode: the image upside down, the label plus 10."""
    header, image = mx.recordio.unpack(record)
    pixels = mx.image.imdecode(image, flag=0).asnumpy()
    return pixels[::-1].transpose(2, 0, 1), header.label + 10


def test_a_custom_decode_gives_the_samples(digits):
    rec, idx, images, labels = digits
    ds = RecordIODataset(rec, idx, (1, 8, 8), decode=decode_flipped)
    batch = next(DatasetIter(ds, 4))
    np.testing.assert_array_equal(batch.data[0].asnumpy()[:, 0], images[:4, ::-1])
    np.testing.assert_array_equal(batch.label[0].asnumpy(), labels[:4] + 10)
    two = RecordIODataset(rec, idx, (1, 8, 8), 2, decode=lambda r: (np.zeros((1, 8, 8)), [1, 2]))
    assert two.take(np.array([0, 1]))[1][0].tolist() == [[1, 2], [1, 2]]
    assert DatasetIter(two, 4).provide_label[0].shape == (4, 2)


def rewrite_idx(idx, tmp_path, edit):
    lines = [line.split("\t") for line in open(idx).read().splitlines()]
    path = tmp_path / "edited.idx"
    path.write_text("".join(f"{k}\t{o}\n" for k, o in edit(lines)))
    return str(path)


def test_bad_input_is_refused_in_the_client_in_words(digits, tmp_path):
    rec, idx, _, _ = digits
    shape = (1, 8, 8)
    for bad in [(8, 8), (1, 0, 8), (1, 8.0, 8), "1,8,8", (True, 8, 8)]:
        with pytest.raises(ValueError, match=r"data_shape=.* must be 3 positive ints"):
            RecordIODataset(rec, idx, bad)
    with pytest.raises(ValueError, match=r"label_width=0 must be >= 1"):
        RecordIODataset(rec, idx, shape, label_width=0)
    with pytest.raises(ValueError, match=r"decode=3 is not callable"):
        RecordIODataset(rec, idx, shape, decode=3)
    with pytest.raises(ValueError, match=r"has 2 channels; the default decode makes 1"):
        RecordIODataset(rec, idx, (2, 8, 8))
    with pytest.raises(ValueError, match=rf"rec: no file at '{tmp_path}/none.rec'"):
        RecordIODataset(str(tmp_path / "none.rec"), idx, shape)
    with pytest.raises(ValueError, match=rf"idx: no file at '{tmp_path}/none.idx'"):
        RecordIODataset(rec, str(tmp_path / "none.idx"), shape)

    def refused(edit, pattern):
        with pytest.raises(ValueError, match=pattern) as err:
            RecordIODataset(rec, rewrite_idx(idx, tmp_path, edit), shape)
        assert "edited.idx" in str(err.value) or "digits.rec" in str(err.value), err.value

    size = len(open(rec, "rb").read())
    refused(lambda ls: ls + [["64", "x12"]], r"edited.idx' line 65 is '64\\tx12', not 'key<TAB>")
    refused(lambda ls: [], r"edited.idx' lists no records")
    refused(lambda ls: ls[:-1] + [[ls[-1][0], str(size + 8)]], r"record 63 .* past the end")
    refused(lambda ls: [ls[1], ls[0]] + ls[2:], r"record 1 \(key '0'\) .*offsets must increase")
    refused(lambda ls: [ls[0], [ls[1][0], ls[0][1]]] + ls[2:], r"record 1 .*must increase")
    last_plus_4 = lambda ls: ls[:-1] + [[ls[-1][0], str(int(ls[-1][1]) + 4)]]  # noqa: E731
    refused(last_plus_4, r"does not match rec .*: record 63 \(key '63', at byte \d+\) of .*magic")
    (tmp_path / "binary.idx").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"binary.idx' is not a text file"):
        RecordIODataset(rec, str(tmp_path / "binary.idx"), shape)
    # records that do not decode: the first is checked here, its labels too
    broken, broken_idx, _, _ = write_rec(tmp_path, "broken", {0: b"not a png"}, n=4)
    with pytest.raises(ValueError, match=r"record 0 \(key '0'.*broken.rec' does not decode"):
        RecordIODataset(broken, broken_idx, shape)
    with pytest.raises(ValueError, match=r"record 0 .* has 1 labels, not label_width=2"):
        RecordIODataset(rec, idx, shape, label_width=2)
    with pytest.raises(ValueError, match=r"decodes to data of shape \(8, 8\), not data_shape"):
        RecordIODataset(rec, idx, shape, decode=lambda r: (np.zeros((8, 8)), 0))
    with pytest.raises(TypeError, match="expected a raymodule.data.ArrayDataset or a "):
        DatasetIter([1, 2], 2)


def test_a_bad_record_read_on_a_worker_fails_naming_it(tmp_path):
    rec, idx, _, _ = write_rec(tmp_path, "late", {5: b"not a png"}, n=16)
    ds = RecordIODataset(rec, idx, (1, 8, 8))  # records 0 and 15 are fine
    with raymodule.Module(small_cnn(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        it = DatasetIter(ds, 8)
        mod.bind(it.provide_data, it.provide_label)
        mod.init_params()
        with pytest.raises(raymodule.WorkerError, match=r"record 5 \(key '5'.*late.rec'"):
            mod.score(it, "acc")


class Slow(Dataset):
    """An in-memory dataset whose reads note when they happen and can be held back."""

    def __init__(self, hold: threading.Event | None = None):
        self.data_names = self.label_names = None
        self.data_descs, self.label_descs = [((2,), np.float32)], []
        self.read = []  # the first index of each take, in order
        self.hold = hold

    def __len__(self):
        return 10

    def key(self):
        return "slow"

    def take(self, indices):
        self.read.append(int(indices[0]))
        if self.hold is not None and indices[0] == 9:
            self.hold.wait(30)
        return [np.tile(indices[:, None], 2).astype("float32")], []


def test_a_workers_rows_are_read_a_step_ahead_and_each_wait_is_bounded():
    ds = Slow()
    steps = [np.array([0, 1]), np.array([2, 3]), np.array([4])]
    batches = IndexedParts(ds, steps, [False] * 3, timeout_s=30).batches()
    first = next(batches)
    np.testing.assert_array_equal(first.data[0][:, 0], [0, 1])
    wait_until(lambda: ds.read == [0, 2], 10, "step 1 read ahead", seen=lambda: ds.read)
    assert [b.data[0][0, 0] for b in batches] == [2, 4]

    hold = threading.Event()
    stuck = IndexedParts(Slow(hold), [np.array([9])], [False], timeout_s=0.2)
    with pytest.raises(TimeoutError, match=r"the 1 rows of step 0 .* within 0.2 s"):
        list(stuck.batches())
    hold.set()
    # an ArrayDataset reads the same way
    parts = IndexedParts(ArrayDataset(np.arange(8.0)), [np.array([7, 1])], [False], 5.0)
    assert [b.data[0].tolist() for b in parts.batches()] == [[7.0, 1.0]]
