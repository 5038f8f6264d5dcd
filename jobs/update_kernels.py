"""Time the SGD-momentum update of a model, kernel by kernel, in one process.

The update raymodule's CPU workers apply (``raymodule.worker.native.apply_update``: with
momentum, ``sgd_mom_update``'s arithmetic in numpy on the arrays' memory, a chunk at a time;
until 2026-12-06, each parameter through ``sgd_mom_update``) against MXNet's own
(``Module.update`` with no kvstore): its multi-tensor kernel ``multi_sgd_mom_update`` over
groups of ``MXNET_OPTIMIZER_AGGREGATION_SIZE`` parameters (4 by default), and the same kernel
one parameter at a time. One of jobs/benchmark.py's models is bound three times on one CPU
context (OMP_NUM_THREADS=1, MXNET_CPU_WORKER_NTHREADS=1) from the same parameters, with the
same gradients (one forward and backward of a batch, copied to the other two); each way
then updates its module ``--updates`` times after ``--warmup`` untimed updates, waiting for
MXNet's engine after each, the ways taking turns for ``--rounds`` rounds. Printed: each way's median
milliseconds an update over all rounds, and whether its weights and momentum end equal to
the bit to those of MXNet's grouped update (they start alike and take as many updates).

Run locally:

    python jobs/update_kernels.py
    python jobs/update_kernels.py --model lenet

Run on a Ray cluster (it runs in the job's driver process, on the head node; no Ray workers):

    ray job submit --working-dir . -- python jobs/update_kernels.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import workload  # its models, their batches and thread settings (it imports no MXNet)

os.environ.update(workload.THREAD_ENV)  # before MXNet starts its engine

import jobtools  # noqa: E402
import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from raymodule.worker import native  # noqa: E402

WAYS = {
    "mxnet, grouped": "MXNet's Module.update: multi_sgd_mom_update over groups of 4",
    "mxnet, per parameter": "MXNet's Module.update, one parameter a call of the same kernel",
    "raymodule": "raymodule's worker: sgd_mom_update's arithmetic in numpy, in place",
}


def bound_module(model: str, params: tuple | None, batch) -> mx.mod.Module:
    """``model`` bound on one CPU context to ``batch``'s shapes, SGD with momentum as
    jobs/benchmark.py trains it."""
    mod = mx.mod.Module(workload.build_symbol(mx, model), context=mx.cpu())
    mod.bind(batch.provide_data, batch.provide_label)
    if params is None:
        mod.init_params(mx.init.Xavier())
    else:
        mod.init_params(arg_params=params[0], aux_params=params[1])
    sgd = {"learning_rate": 0.01, "momentum": 0.9, "rescale_grad": 1.0 / workload.MODELS[model]}
    mod.init_optimizer(kvstore=None, optimizer="sgd", optimizer_params=sgd)
    return mod


def updaters(model: str) -> dict:
    """Each way's module and the call that updates it once."""
    data = workload.make_iter(mx, model, 1, 1)
    batch = next(iter(data))
    batch.provide_data, batch.provide_label = data.provide_data, data.provide_label
    grouped = bound_module(model, None, batch)
    grouped.forward_backward(batch)
    arg, aux = grouped.get_params()
    params = ({k: v.copy() for k, v in arg.items()}, {k: v.copy() for k, v in aux.items()})
    per_parameter = bound_module(model, params, batch)
    per_parameter._optimizer.aggregate_num = 0
    per_parameter._updater.aggregate_updates = False
    ours = bound_module(model, params, batch)
    native.update_per_parameter(ours)
    for mod in (per_parameter, ours):  # the gradients of the one forward and backward
        for mine, reference in zip(mod._exec_group.grad_arrays, grouped._exec_group.grad_arrays):
            if mine[0] is not None:
                reference[0].copyto(mine[0])
    mx.nd.waitall()
    grads = native.gradient_arrays(ours)[0]
    return {
        "mxnet, grouped": (grouped, grouped.update),
        "mxnet, per parameter": (per_parameter, per_parameter.update),
        "raymodule": (ours, lambda: native.apply_update(ours, grads)),
    }


def timed(update, updates: int, warmup: int) -> list[float]:
    """Seconds of each of ``updates`` updates, the engine waited for, after ``warmup``."""
    seconds = []
    for step in range(warmup + updates):
        tic = time.perf_counter()
        update()
        mx.nd.waitall()
        if step >= warmup:
            seconds.append(time.perf_counter() - tic)
    return seconds


def state_of(mod: mx.mod.Module) -> list[np.ndarray]:
    """The module's weights and momentum, in parameter order."""
    weights, states = native.updated_arrays(mod)
    return [a.asnumpy() for a in weights + states if a is not None]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=jobtools.HelpFormatter
    )
    workload.add_model_option(parser)
    parser.add_argument("--updates", type=int, default=100, help="timed updates a round per way")
    parser.add_argument("--warmup", type=int, default=10, help="untimed updates before them")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the ways taking turns")
    args = parser.parse_args(argv)
    if "MXNET_OPTIMIZER_AGGREGATION_SIZE" in os.environ:  # the grouping this job compares
        parser.error("unset MXNET_OPTIMIZER_AGGREGATION_SIZE: it changes the ways compared")
    if args.updates < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--updates and --rounds must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ways = updaters(args.model)
    seconds = {way: [] for way in ways}
    for _ in range(args.rounds):
        for way, (_, update) in ways.items():
            seconds[way] += timed(update, args.updates, args.warmup)
    reference = state_of(ways["mxnet, grouped"][0])
    print(
        f"{args.model}: one SGD-momentum update of its parameters, ms (median of "
        f"{args.rounds} x {args.updates}), and its bits against MXNet's grouped update"
    )
    print(f"{'way':<22}{'ms':>8}  {'bits':<10}what")
    for way, (mod, _) in ways.items():
        same = all(np.array_equal(a, b) for a, b in zip(state_of(mod), reference))
        median = statistics.median(seconds[way]) * 1e3
        print(f"{way:<22}{median:>8.3f}  {'equal' if same else 'DIFFERENT':<10}{WAYS[way]}")
    return 0


if __name__ == "__main__":
    jobtools.run_job(main)
