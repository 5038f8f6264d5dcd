"""Ray Tune sweeps over raymodule training.

A trial function builds a :class:`raymodule.Module` and fits it, as a script would::

    def train_fn(config):
        report = raymodule.tune.report_callback()
        with raymodule.Module(net, context=raymodule.tune.workers()) as mod:
            mod.fit(train_iter, eval_data=val_iter, num_epoch=10,
                    optimizer_params={"learning_rate": config["lr"]},
                    batch_end_callback=report, eval_end_callback=report,
                    run=raymodule.tune.run_config())

    tuner = ray.tune.Tuner(
        raymodule.tune.with_workers(train_fn, num_workers=2),
        param_space={"lr": ray.tune.loguniform(1e-3, 1)},
        tune_config=ray.tune.TuneConfig(metric="validation-accuracy", mode="max",
                                        scheduler=ASHAScheduler(), num_samples=8),
    )

- **Reservation.** :func:`with_workers` makes ``train_fn`` a trainable whose trial reserves,
  in one placement group, a head bundle for the trial's own process (``head_cpus``, default 0:
  like the client of a plain run, it reserves nothing) and one bundle per worker. The trial
  process captures the group for what it starts, so the module's controller and workers land
  in the trial's bundles (raymodule's worker group uses the current placement group and makes
  none); a trial starts only once all of them fit, so trials never hold half their workers
  and wait on each other. The module must ask for the workers the trial reserved:
  :func:`workers` gives exactly those.
- **Reports.** :func:`report_callback` reports MXNet's metrics once per epoch (``epoch``,
  ``train-<name>``, ``validation-<name>``) with a Tune checkpoint: the run checkpoint that
  ``fit(run=...)`` committed at that epoch's end, copied as it is (MXNet's files, the optimizer
  state and the manifest; plain ``mx.mod.Module.load(<checkpoint>/model, epoch)`` reads it),
  plus ``raymodule-source.json``: the trial, run checkpoint and restore it came from. A report
  goes out once ``fit`` has recorded the epoch in the run, so a trial that Tune stops at a
  report still leaves a complete run.
- **Restores.** When Tune starts a trial from a checkpoint (PBT exploiting a better trial,
  or a trial restored after a failure), :func:`run_config` verifies that checkpoint and commits
  it into the trial's run as its newest checkpoint (dropping the run's later ones), so
  ``fit(run=...)`` resumes from it by its usual path: parameters, optimizer state, schedule and
  position in the data come back; hyperparameters come from the trial's (new) config.
- **Storage.** Each trial's run is ``<experiment>/raymodule_runs/<trial id>``, under the Tune
  experiment's storage (a local path, or a URI such as ``s3://`` whose keys the trial processes
  get as everywhere in raymodule: from the usual AWS variables or the machine's role), so
  ``raymodule runs <experiment>/raymodule_runs`` lists every trial's run. A ``name`` given to
  :func:`run_config` is a folder holding one run per trial (``<name>/<trial id>``): trials never
  share a run, so none resumes from another's weights but through Tune.

Ray Tune is imported when these functions are called, not with raymodule. The modules:
:mod:`.trial` (the trial this process runs), :mod:`.reservation` (:func:`with_workers`,
:func:`workers`), :mod:`.runs` (:func:`run_config`, restores) and :mod:`.reports`
(:func:`report_callback`).
"""

from .reports import ReportCallback, report_callback
from .reservation import with_workers, workers
from .runs import RUNS, SOURCE, run_config
from .trial import TrialResources

__all__ = [
    "with_workers",
    "workers",
    "report_callback",
    "ReportCallback",
    "run_config",
    "TrialResources",
    "RUNS",
    "SOURCE",
]
