"""Train an LSTM language model with sentence-length buckets, with raymodule on 2 Ray workers.

The corpus is the Python documentation that ships with the interpreter
(``pydoc_data.topics.topics``, the text behind ``help('for')``, part of the standard library:
nothing is downloaded). It is split into sentences (on . ! ? and blank lines) of lowercase
words; the most frequent ``--vocab`` words are kept (others become ``<unk>``) and a fixed 10 %
of the sentences is held out for validation. The model is MXNet's bucketing LSTM language model
(``example/rnn/bucketing/lstm_bucketing.py``): one network unrolled per bucket of sentence
lengths, all sharing their parameters, trained by ``raymodule.BucketingModule``; each global
batch is split across the workers and their gradients are summed. Perplexity is reported per
epoch.

The run is checkpointed to ``--storage``/``--name`` (every ``--checkpoint-every`` batches and
at each epoch's end); started again with the same name, it resumes where it stopped.

Run locally (raymodule starts a Ray on 127.0.0.1 with this machine's CPUs):

    python jobs/bucketing.py
    python jobs/bucketing.py --name pydoc-lm --epochs 20 --num-layers 2

Run on a Ray cluster (from the repository root; the job joins the cluster through RAY_ADDRESS),
with the run in object storage so that a resubmitted job resumes it:

    ray job submit --working-dir . -- python jobs/bucketing.py --name pydoc-lm \
        --storage 's3://my-bucket/runs?region=us-east-1'

Its parts are importable (``from bucketing import load_corpus, lstm_sym_gen`` with jobs/ on
``sys.path``); importing it trains nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import random
import re
import sys
import time
from collections import Counter

import mxnet as mx
import numpy as np
from jobtools import (
    EpochProgress,
    HelpFormatter,
    add_run_options,
    add_training_options,
    check_storage,
    check_training_options,
    contexts,
    run_config,
    run_job,
)

import raymodule

INVALID = 0  # padding id: ignored as a label by the loss and by the perplexity
UNK = 1  # words outside the vocabulary
SPECIALS = ("<pad>", "<unk>")
BUCKETS = (10, 20, 30, 40)
_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n\s*\n")  # "os.path" does not end a sentence
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+")


def load_corpus(
    vocab_size: int, seed: int, max_len: int = max(BUCKETS), val_fraction: float = 0.1
) -> tuple[list[list[int]], list[list[int]], dict[str, int]]:
    """The Python documentation as encoded sentences: ``(train, validation, vocab)``.

    Distinct sentences of 2 to ``max_len`` words are kept; ``val_fraction`` of them, drawn
    with ``seed``, are held out. ``vocab`` maps ``<pad>`` to 0 (:data:`INVALID`), ``<unk>`` to 1
    and the ``vocab_size - 2`` most frequent training words to 2, 3, ...; so
    ``len(vocab) <= vocab_size`` is the size of the model's input and output.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    sentences = [_WORD.findall(part.lower()) for part in _SENTENCE_END.split(text)]
    # the documentation repeats itself ("changed in version 3 7"): keep each sentence once,
    # so that no validation sentence is also a training sentence
    sentences = list(dict.fromkeys(tuple(s) for s in sentences if 2 <= len(s) <= max_len))
    order = np.random.RandomState(seed).permutation(len(sentences))
    n_val = round(len(sentences) * val_fraction)
    val = [sentences[i] for i in sorted(order[:n_val])]
    train = [sentences[i] for i in sorted(order[n_val:])]

    counts = Counter(word for sentence in train for word in sentence)
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))]
    vocab = {word: i for i, word in enumerate([*SPECIALS, *words[: vocab_size - len(SPECIALS)]])}

    def encode(sentence_list):
        return [[vocab.get(w, UNK) for w in s] for s in sentence_list]

    return encode(train), encode(val), vocab


def lstm_sym_gen(vocab_size: int, num_embed: int, num_hidden: int, num_layers: int):
    """MXNet's bucketing LSTM language model: ``sym_gen(seq_len)`` gives the network unrolled
    ``seq_len`` steps, ``(symbol, data_names, label_names)``; every length shares the same
    parameters. Labels equal to :data:`INVALID` (padding) carry no loss."""
    stack = mx.rnn.SequentialRNNCell()
    for i in range(num_layers):
        stack.add(mx.rnn.LSTMCell(num_hidden=num_hidden, prefix=f"lstm_l{i}_"))

    def sym_gen(seq_len):
        data = mx.sym.Variable("data")
        label = mx.sym.Variable("softmax_label")
        embed = mx.sym.Embedding(data, input_dim=vocab_size, output_dim=num_embed, name="embed")
        stack.reset()
        outputs, _ = stack.unroll(seq_len, inputs=embed, merge_outputs=True)
        pred = mx.sym.Reshape(outputs, shape=(-1, num_hidden))
        pred = mx.sym.FullyConnected(pred, num_hidden=vocab_size, name="pred")
        label = mx.sym.Reshape(label, shape=(-1,))
        pred = mx.sym.SoftmaxOutput(
            pred, label=label, use_ignore=True, ignore_label=INVALID, name="softmax"
        )
        return pred, ("data",), ("softmax_label",)

    return sym_gen


class SentenceIter(mx.rnn.BucketSentenceIter):
    """``mx.rnn.BucketSentenceIter`` that shuffles with random generators of its own, so its
    order depends only on ``seed`` and on how often it was reset: a resumed run (which resets
    a fresh iterator once per finished epoch) sees the batches an uninterrupted run saw.

    With ``complete=True`` every bucket is filled up to whole batches with all-padding rows,
    which carry no loss and count nowhere: every sentence is scored, the same ones each time.
    """

    def __init__(self, sentences, batch_size, buckets, seed, complete=False):
        sentences = list(sentences)
        if complete:
            lengths = Counter(min(b for b in buckets if b >= len(s)) for s in sentences)
            for bucket, n in lengths.items():
                sentences += [[INVALID] * bucket] * (-n % batch_size)
        self._rng = (random.Random(seed).getstate(), np.random.RandomState(seed).get_state())
        with contextlib.redirect_stdout(io.StringIO()):  # "WARNING: discarded 0 sentences"
            super().__init__(sentences, batch_size, buckets=list(buckets), invalid_label=INVALID)

    def reset(self):
        saved = random.getstate(), np.random.get_state()
        random.setstate(self._rng[0])
        np.random.set_state(self._rng[1])
        try:
            super().reset()
        finally:
            self._rng = random.getstate(), np.random.get_state()
            random.setstate(saved[0])
            np.random.set_state(saved[1])

    def __len__(self) -> int:
        return len(self.idx)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a bucketing LSTM language model on the Python documentation with "
        "raymodule workers, reporting perplexity.",
        formatter_class=HelpFormatter,
    )
    add_training_options(parser, epochs=8, batch_size=32)
    parser.add_argument(
        "--buckets",
        default=",".join(map(str, BUCKETS)),
        help="comma-separated sentence lengths the LSTM is unrolled to; longer sentences are "
        "left out",
    )
    parser.add_argument(
        "--vocab", type=int, default=2000, help="vocabulary size, <pad> and <unk> included"
    )
    parser.add_argument("--num-embed", type=int, default=64, help="word embedding size")
    parser.add_argument("--num-hidden", type=int, default=128, help="LSTM hidden units")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked LSTM layers")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    parser.add_argument(
        "--clip-gradient", type=float, default=0.25, help="clip each gradient element to +-this"
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the split, the init and the batch order"
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    check_training_options(parser, args)
    try:
        args.buckets = sorted({int(b) for b in args.buckets.split(",")})
    except ValueError:
        parser.error(f"--buckets={args.buckets!r}: expected comma-separated integers")
    if args.buckets[0] < 2:
        parser.error(f"--buckets={args.buckets}: every length must be at least 2")
    if args.vocab < len(SPECIALS) + 1:
        parser.error(f"--vocab={args.vocab}: need at least {len(SPECIALS) + 1}")
    for option in ("num_embed", "num_hidden", "num_layers"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')}={getattr(args, option)}: need at least 1")
    if not args.lr > 0:
        parser.error(f"--lr={args.lr}: must be > 0")
    if not args.clip_gradient > 0:
        parser.error(f"--clip-gradient={args.clip_gradient}: must be > 0")
    args.run = run_config(parser, args)
    return args


class Progress(EpochProgress):
    """A progress bar per epoch with the running training perplexity, and a line per epoch
    with the training and validation perplexity (``eval_end_callback``)."""

    def __init__(self, batches_per_epoch: int):
        super().__init__(batches_per_epoch, digits=1)
        self.validation: list[float] = []  # per epoch trained in this process

    def epoch_end(self, param: mx.model.BatchEndParam) -> None:
        _, value = param.eval_metric.get()
        self.validation.append(value)
        print(
            f"epoch {param.epoch + 1}: train perplexity {self.value:.1f}, "
            f"validation perplexity {value:.1f}",
            flush=True,
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("raymodule.run").setLevel(logging.INFO)  # where the run resumes
    check_storage(args.run)  # before Ray starts: a --storage that cannot be written ends here
    train, val, vocab = load_corpus(args.vocab, args.seed, max_len=max(args.buckets))
    data_train = SentenceIter(train, args.batch_size, args.buckets, seed=args.seed)
    data_val = SentenceIter(val, args.batch_size, args.buckets, seed=args.seed, complete=True)
    if len(data_train) == 0:
        print(
            f"error: --batch-size={args.batch_size} leaves no full batch in any bucket of "
            f"{args.buckets}",
            file=sys.stderr,
        )
        return 2
    print(
        f"Python {sys.version_info.major}.{sys.version_info.minor} documentation: "
        f"{len(train)} training and {len(val)} validation sentences of 2-{max(args.buckets)} "
        f"words, vocabulary {len(vocab)}; buckets {args.buckets}, {len(data_train)} batches "
        f"per epoch; {args.workers} workers, global batch {args.batch_size}"
    )

    random.seed(args.seed)
    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    progress = Progress(len(data_train))
    sym_gen = lstm_sym_gen(len(vocab), args.num_embed, args.num_hidden, args.num_layers)
    start = time.monotonic()
    with raymodule.BucketingModule(
        sym_gen=sym_gen,
        default_bucket_key=data_train.default_bucket_key,
        context=contexts(args),
    ) as mod:
        mod.fit(
            data_train,
            eval_data=data_val,
            eval_metric=mx.metric.Perplexity(INVALID),
            kvstore="device",
            optimizer="sgd",
            optimizer_params={
                "learning_rate": args.lr,
                "momentum": 0.0,
                "wd": 1e-5,
                "clip_gradient": args.clip_gradient,
            },
            initializer=mx.init.Xavier(factor_type="in", magnitude=2.34),
            num_epoch=args.epochs,
            batch_end_callback=progress,
            eval_end_callback=progress.epoch_end,
            run=args.run,
        )
    elapsed = time.monotonic() - start
    if progress.validation:
        first, last = progress.validation[0], progress.validation[-1]
        print(
            f"validation perplexity {first:.1f} -> {last:.1f} over the "
            f"{len(progress.validation)} epochs trained here ({elapsed:.1f} s)"
        )
    else:
        print(f"nothing to train: the run already has {args.epochs} epochs ({elapsed:.1f} s)")
    ckpt = raymodule.latest_checkpoint(args.run.location)
    if ckpt is None:
        print(f"run {args.run.name!r} at {args.run.location}: no checkpoint")
    else:
        print(f"latest checkpoint: {ckpt.location} (epoch {ckpt.epoch}, step {ckpt.global_step})")
    return 0


if __name__ == "__main__":
    run_job(main)
