"""Pack scikit-learn's handwritten digits as MXNet RecordIO image records, then train a small
CNN on them with raymodule on 2 Ray workers that each read their own records.

The 1,797 8x8 digits (shipped inside scikit-learn: nothing is downloaded) are split 80/20 by
``--seed`` and written as PNG image records by MXNet's own ``mx.recordio.MXIndexedRecordIO``
(``train.rec``/``train.idx``, ``test.rec``/``test.idx``) into ``--records``: a local folder,
or a URI such as ``s3://...`` they are uploaded to. Training then reads them from there with
``raymodule.RecordIODataset``: the client reads only the ``.idx`` files, and each worker reads
the byte ranges of its own rows of every batch (a batch ahead, while it computes). The model
and the run (checkpoints in ``--storage``, resumed by ``--name``) are ``jobs/train.py``'s with
``--data recordio``.

Run locally (raymodule starts a Ray on 127.0.0.1 with this machine's CPUs):

    python jobs/digits_rec.py
    python jobs/digits_rec.py --records ./digits_rec --epochs 10 --name digits-rec

Run on a Ray cluster (from the repository root), with the records in object storage that
every node can read (a local --records folder is on the submitting node only):

    ray job submit --working-dir . -- python jobs/digits_rec.py \
        --records 's3://my-bucket/digits-rec?region=us-east-1' \
        --storage 's3://my-bucket/runs?region=us-east-1'
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile

import mxnet as mx
import numpy as np
from jobtools import (
    HelpFormatter,
    add_training_options,
    check_storage,
    check_training_options,
    run_config,
    run_job,
)
from PIL import Image  # PNG encoding: mx.recordio.pack_img needs OpenCV's Python module
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from train import add_model_options, cnn, fit_and_report, records

from raymodule.storage import Folder, redact

DATA_SHAPE = (1, 8, 8)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write scikit-learn's digits as MXNet RecordIO files and train a small CNN "
        "on them with raymodule workers that read their own records.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--records",
        default="./digits_rec",
        help="folder to write train.rec/.idx and test.rec/.idx to and train from: a local "
        "path or a URI such as 's3://bucket/digits-rec?endpoint_override=127.0.0.1:9000"
        "&scheme=http' (keys from the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables)",
    )
    add_training_options(parser, epochs=10, batch_size=64)
    add_model_options(parser)
    args = parser.parse_args(argv)
    check_training_options(parser, args)
    args.run = run_config(parser, args)
    return args


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_records(records: str, seed: int) -> dict[str, str]:
    """Writes the digits' training and test splits as indexed RecordIO image records into the
    folder ``records`` (packed in a local temporary folder by MXNet, then copied there);
    returns each file's location by name."""
    data = load_digits()
    pixels = np.minimum(data.images * 16, 255).astype("uint8")  # 0-16 -> 0-255
    splits = train_test_split(
        pixels, data.target, test_size=0.2, random_state=seed, stratify=data.target
    )
    folder = Folder(records)
    with tempfile.TemporaryDirectory(prefix="digits-rec-") as packed:
        for name, images, labels in (
            ("train", splits[0], splits[2]),
            ("test", splits[1], splits[3]),
        ):
            rec, idx = os.path.join(packed, f"{name}.rec"), os.path.join(packed, f"{name}.idx")
            writer = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
            for i, (image, label) in enumerate(zip(images, labels)):
                header = mx.recordio.IRHeader(0, float(label), i, 0)
                writer.write_idx(i, mx.recordio.pack(header, png(image)))
            writer.close()
            for path in (rec, idx):
                with open(path, "rb") as f:
                    folder.write(os.path.basename(path), f.read())
    return {name: folder.uri(name) for name in ("train.rec", "train.idx", "test.rec", "test.idx")}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("raymodule.run").setLevel(logging.INFO)  # where the run resumes
    check_storage(args.run)  # before Ray starts: a --storage that cannot be written ends here
    try:
        files = write_records(args.records, args.seed)
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"digits_rec.py: error: --records {redact(args.records)!r}: {err}"
        ) from None
    print(f"wrote {', '.join(sorted(files))} to {redact(args.records)}")
    # the options jobs/train.py --data recordio takes, for its iterators and its model
    args.rec, args.idx = files["train.rec"], files["train.idx"]
    args.test_rec, args.test_idx = files["test.rec"], files["test.idx"]
    args.data_shape = DATA_SHAPE
    train, test = records(args)
    print(
        f"digits as records: {train.num_data} training and {test.num_data} test images of "
        f"8x8 pixels; {args.workers} workers, global batch {args.batch_size}"
    )
    return fit_and_report(args, cnn(), train, test)


if __name__ == "__main__":
    run_job(main)
