"""What a run folder says about its run: a summary to read, a PNG to look at, and the runs
under a storage location.

Reads ``metrics.jsonl`` (one JSON line per epoch; lines without ``epoch``, such as membership
changes, and keys it does not know are tolerated) and the run's checkpoints, through
:mod:`raymodule.storage` only. matplotlib is imported when a figure is drawn, not before, so
importing this module (or raymodule) stays light.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from . import checkpoint
from .run import METRICS, METRICS_MAX_BYTES
from .storage import Folder, Refused, is_uri

__all__ = [
    "RunRecord",
    "RunRow",
    "default_output",
    "list_runs",
    "load_run",
    "lower_is_better",
    "parse_metrics",
    "plot",
    "runs_table",
    "summary",
]

log = logging.getLogger(__name__)

# metric names (MXNet's, lowercased) for which smaller is better; every other is larger-better
_LOWER_IS_BETTER = ("loss", "entropy", "perplexity", "error", "mae", "mse", "rmse")


def lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return any(word in name for word in _LOWER_IS_BETTER)


@dataclass
class RunRecord:
    """A run folder's ``metrics.jsonl`` and latest verified checkpoint."""

    folder: Folder
    entries: list[dict]
    """Every line of ``metrics.jsonl`` that is a JSON object, in the order written."""
    latest: checkpoint.Checkpoint | None = None

    @property
    def name(self) -> str:
        location = self.folder.location
        path = urlsplit(location).path if is_uri(location) else location
        return path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def epochs(self) -> list[dict]:
        """The epoch lines (those with an integer ``epoch``)."""
        return [e for e in self.entries if _is_epoch(e)]

    @property
    def events(self) -> list[dict]:
        """The membership changes (``{"event": "membership", ...}``)."""
        return [e for e in self.entries if _is_membership(e)]

    @property
    def work_splits(self) -> list[dict]:
        """The re-weightings of ``work_load_list="auto"`` (``{"event": "work_load", ...}``)."""
        return [e for e in self.entries if _is_work_split(e)]

    def metric_names(self, part: str) -> list[str]:
        """The metrics of ``part`` (``train`` or ``validation``) any epoch recorded, in order."""
        names: dict[str, None] = {}
        for entry in self.epochs:
            names.update(dict.fromkeys(_numbers(entry.get(part))))
        return list(names)

    def best(self, metric: str) -> tuple[float, int] | None:
        """The best validation value of ``metric`` and its epoch (the first, on a tie)."""
        found = [
            (value, entry["epoch"])
            for entry in self.epochs
            if (value := _numbers(entry.get("validation")).get(metric)) is not None
        ]
        if not found:
            return None
        sign = 1 if lower_is_better(metric) else -1
        return min(found, key=lambda pair: (sign * pair[0], pair[1]))


def _numbers(metrics) -> dict[str, float]:
    """The numeric values of a ``{metric: value}`` mapping; anything else is skipped."""
    if not isinstance(metrics, dict):
        return {}
    return {name: float(value) for name, value in metrics.items() if _is_number(value)}


def parse_metrics(text: str) -> list[dict]:
    """The lines of a ``metrics.jsonl`` that are JSON objects, in order (a torn last line, or
    anything else that is not an object, is skipped)."""
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _is_epoch(entry: dict) -> bool:
    return isinstance(entry.get("epoch"), int) and not isinstance(entry.get("epoch"), bool)


def _is_membership(entry: dict) -> bool:
    return entry.get("event") == "membership" and not _is_epoch(entry)


def _is_work_split(entry: dict) -> bool:
    return (
        entry.get("event") == "work_load"
        and isinstance(entry.get("weights"), dict)
        and not _is_epoch(entry)
    )


def load_run(location: str) -> RunRecord:
    """Reads the run folder at ``location`` (a local path or URI).

    Raises ``ValueError`` for a location that is not a run with recorded epochs (saying what is
    there instead) and ``OSError`` when storage cannot be read; both name the redacted location.
    """
    folder = Folder(location)
    try:
        text = folder.read(METRICS, limit=METRICS_MAX_BYTES).decode(errors="replace")
    except FileNotFoundError:
        raise ValueError(_not_a_run(folder)) from None
    entries = parse_metrics(text)
    if not any(map(_is_epoch, entries)):
        raise ValueError(f"{folder}/{METRICS} records no epoch yet: nothing to report")
    return RunRecord(folder, entries, checkpoint.latest(folder))


def _not_a_run(folder: Folder) -> str:
    if not folder.exists(""):
        return f"no run at {folder}: there is no such folder"
    names = checkpoint.checkpoint_names(folder)
    if names:
        return (
            f"{folder} has {len(names)} checkpoint folders but no {METRICS} (no epoch has "
            "finished yet): nothing to report"
        )
    runs = [row.name for row in list_runs(folder)]
    hint = f"; the runs in it are: {', '.join(runs)}" if runs else ""
    return f"{folder} is not a run folder: it has no {METRICS}{hint}"


def _num(value: float) -> str:
    """A metric value: 4 significant digits (thousands grouped when larger)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _rate(value: float) -> str:
    """Samples/s: whole numbers, thousands grouped."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={_num(v)}" for k, v in metrics.items()) or "none recorded"


def summary(run: RunRecord) -> str:
    """The run in a few aligned lines."""
    last = run.epochs[-1]
    epochs = sorted({e["epoch"] for e in run.epochs})
    rows = [
        ("epochs trained", f"{len(epochs)} (epochs {epochs[0]}-{epochs[-1]})"),
        ("global steps", str(last.get("global_step", "?"))),
        ("final train", _metrics_text(_numbers(last.get("train")))),
    ]
    validation = run.metric_names("validation")
    if validation:
        rows.append(("final validation", _metrics_text(_numbers(last.get("validation")))))
        for metric in validation:
            value, epoch = run.best(metric)
            way = "lowest" if lower_is_better(metric) else "highest"
            rows.append(("best validation", f"{metric}={_num(value)} at epoch {epoch} ({way})"))
    else:
        rows.append(("final validation", "none recorded (fit had no eval_data)"))

    speeds = [speed for _, speed in _per_epoch(run, "samples_per_s")]
    if speeds:
        rows.append(
            (
                "throughput",
                f"{_rate(statistics.fmean(speeds))} samples/s, mean of {len(speeds)} epochs "
                f"(from {_rate(min(speeds))} to {_rate(max(speeds))})",
            )
        )
    sizes = _world_sizes(run)
    rows.append(("world size", " -> ".join(str(s) for s in sizes) if sizes else "?"))
    for event in run.events:
        lost = event.get("lost")
        change = event.get("change")
        rows.append(
            (
                "membership",
                f"{event.get('time', '?')}: "
                + (f"{change}, " if isinstance(change, str) else "")
                + f"world size {event.get('world_size', '?')}"
                + (f", lost {', '.join(map(str, lost))}" if isinstance(lost, list) else ""),
            )
        )
    for event in run.work_splits:
        weights = event["weights"].items()
        split = ", ".join(f"slot {k} {_num(v)}" for k, v in weights if _is_number(v))
        rows.append(
            ("work split", f"{event.get('time', '?')}: step {event.get('step', '?')}: {split}")
        )
    step_seconds = last.get("step_seconds")
    if isinstance(step_seconds, list) and step_seconds and all(map(_is_number, step_seconds)):
        rows.append(
            ("step seconds", "per worker, last epoch: " + ", ".join(map(_num, step_seconds)))
        )

    writes = [
        c["seconds"]
        for e in run.epochs
        for c in e.get("checkpoints") or []
        if isinstance(c, dict) and _is_number(c.get("seconds"))
    ]
    rows.append(
        (
            "checkpoints",
            f"{len(writes)} committed, mean write {statistics.fmean(writes):.3f} s"
            if writes
            else "none committed during the recorded epochs",
        )
    )
    rows.append(("latest checkpoint", _checkpoint_text(run.latest)))
    resumes = [e for e in run.epochs if (e.get("resumed_at_batch") or 0) > 0]
    if resumes:
        rows.append(
            (
                "resumed",
                "; ".join(f"epoch {e['epoch']} at batch {e['resumed_at_batch']}" for e in resumes),
            )
        )
    width = max(len(label) for label, _ in rows)
    lines = [f"run {run.name}  ({run.folder})"]
    lines += [f"  {label:<{width}}  {text}" for label, text in rows]
    return "\n".join(lines)


def _checkpoint_text(ckpt: checkpoint.Checkpoint | None) -> str:
    if ckpt is None:
        return "no committed checkpoint that verifies"
    when = ckpt.manifest.get("time")
    return (
        f"{ckpt.name}: epoch {ckpt.epoch}, batch {ckpt.batch}, step {ckpt.global_step}"
        + (f", {when}" if when else "")
        + " (verified)"
    )


def _is_number(value) -> bool:
    """An int or float that is not NaN (nor a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _world_sizes(run: RunRecord) -> list[int]:
    """The world sizes in the order they held, repeats collapsed."""
    sizes = []
    for entry in run.entries:
        size = entry.get("world_size")
        if (_is_epoch(entry) or _is_membership(entry)) and isinstance(size, int):
            if not sizes or sizes[-1] != size:
                sizes.append(size)
    return sizes


def _time(entry: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(entry["time"])
    except (KeyError, TypeError, ValueError):
        return None


def plot(run: RunRecord) -> bytes:
    """A PNG of the run: training curves (train and validation per epoch, one panel per
    metric, the best validation value starred), throughput per epoch, and the world size with
    its membership changes. Resumed epochs are marked in each. Names from the run are drawn as
    they are written (a ``$`` in a metric's name is no formula)."""
    from matplotlib import rc_context

    with rc_context({"text.parse_math": False}):
        return _draw(run)


def _draw(run: RunRecord) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys(run.metric_names("train") + run.metric_names("validation")))
    metrics = metrics[:3] or [None]
    columns = max(2, len(metrics))
    fig = Figure(figsize=(4.2 * columns, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2 * columns)  # metrics share the top row, the rest the bottom
    width = 2 * columns // len(metrics)
    for i, metric in enumerate(metrics):
        _plot_metric(fig.add_subplot(grid[0, i * width : (i + 1) * width]), run, metric)
    _plot_throughput(fig.add_subplot(grid[1, :columns]), run)
    _plot_world_size(fig.add_subplot(grid[1, columns:]), run)
    when = ""
    first, last = _time(run.epochs[0]), _time(run.epochs[-1])
    if first and last:
        end = f"{last:%H:%M}" if last.date() == first.date() else f"{last:%Y-%m-%d %H:%M}"
        when = f"   {first:%Y-%m-%d %H:%M} to {end} UTC"
    fig.suptitle(f"run {run.name}{when}", fontsize="large", weight="bold")
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


def _per_epoch(run: RunRecord, key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of every epoch line whose ``key`` is a number."""
    return [(e["epoch"], e[key]) for e in run.epochs if _is_number(e.get(key))]


def _resumed(run: RunRecord) -> list[int]:
    return [e["epoch"] for e in run.epochs if (e.get("resumed_at_batch") or 0) > 0]


def _epoch_axis(ax, run: RunRecord, title: str, ylabel: str | None = None) -> None:
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    epochs = sorted({e["epoch"] for e in run.epochs})
    if len(epochs) <= 20:
        ax.set_xticks(epochs)
    ax.grid(alpha=0.3)


def _plot_metric(ax, run: RunRecord, metric: str | None) -> None:
    if metric is None:
        ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center")
        ax.set_axis_off()
        return
    for part, style in (("train", "-o"), ("validation", "--s")):
        points = [
            (e["epoch"], value)
            for e in run.epochs
            if (value := _numbers(e.get(part)).get(metric)) is not None
        ]
        if points:
            ax.plot(*zip(*points), style, label=part, markersize=4)
    best = run.best(metric)
    if best is not None:
        value, epoch = best
        ax.plot(epoch, value, "*", color="goldenrod", markersize=15, zorder=5,
                label=f"best validation {_num(value)} (epoch {epoch})")  # fmt: skip
    for i, epoch in enumerate(_resumed(run)):
        ax.axvline(epoch, color="gray", linestyle=":", label=None if i else "resumed")
    way = "lower is better" if lower_is_better(metric) else "higher is better"
    _epoch_axis(ax, run, f"{metric} ({way})")
    ax.legend(fontsize="small")


def _plot_throughput(ax, run: RunRecord) -> None:
    from matplotlib.patches import Patch

    speeds = _per_epoch(run, "samples_per_s")
    _epoch_axis(ax, run, "throughput", "samples/s")
    if not speeds:
        return
    resumed = _resumed(run)
    xs, ys = zip(*speeds)
    ax.bar(xs, ys, width=0.7, color=["tab:orange" if x in resumed else "tab:blue" for x in xs])
    mean = statistics.fmean(ys)
    handles = [
        ax.axhline(mean, color="black", linestyle="--", linewidth=1,
                   label=f"mean {_rate(mean)} samples/s")
    ]  # fmt: skip
    if resumed:
        handles.append(Patch(color="tab:orange", label="resumed epoch (partial)"))
    ax.set_ylim(0, max(ys) * (1.35 if resumed else 1.2))  # room for the legend above the bars
    ax.legend(handles=handles, fontsize="small", loc="upper left")


def _plot_world_size(ax, run: RunRecord) -> None:
    """The world size as a step line over the epochs, changing where each membership change
    fell (a red line, labelled with the new size and who was lost)."""
    events = _event_positions(run)
    at_epochs = _per_epoch(run, "world_size")
    points = sorted(
        at_epochs + [(x, e["world_size"]) for x, e in events if _is_number(e.get("world_size"))]
    )
    top = max([size for _, size in points] + [1])
    if points:
        ax.plot(*zip(*points), drawstyle="steps-post", color="tab:green", linewidth=2)
    if at_epochs:
        ax.plot(*zip(*at_epochs), "o", color="tab:green", markersize=4)
    for x, _ in _event_positions(run, _is_work_split):  # work_load_list="auto" re-weighted
        ax.axvline(x, color="tab:blue", linestyle=":", linewidth=1)
    for i, (x, event) in enumerate(events):
        ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
        text = f" -> {event.get('world_size', '?')} workers"  # a space clear of the line
        lost = event.get("lost")
        if lost:
            names = ", ".join(map(str, lost))
            text += "\n lost " + (names if len(names) <= 28 else names[:27] + "...")
        ax.text(x, top + 0.25 + 0.55 * (i % 2), text, color="tab:red", fontsize="x-small",
                ha="left", va="bottom")  # fmt: skip
    changes = {0: "no membership changes", 1: "1 membership change"}.get(
        len(events), f"{len(events)} membership changes"
    )
    if run.work_splits:  # the title must fit its half of the figure
        changes = f"{len(events)} changes, {len(run.work_splits)} re-weighted (dotted)"
    _epoch_axis(ax, run, f"world size ({changes})", "workers")
    ax.set_ylim(0, top + 1.5)
    ax.yaxis.get_major_locator().set_params(integer=True)


def _event_positions(run: RunRecord, which=_is_membership) -> list[tuple[float, dict]]:
    """Each event ``which`` picks (membership changes) with where it falls on the epoch axis:
    between the epoch lines written before and after it, by time when both times are known,
    else halfway."""
    placed, before = [], None
    for i, entry in enumerate(run.entries):
        if _is_epoch(entry):
            before = entry
        elif which(entry):
            after = next((e for e in run.entries[i + 1 :] if _is_epoch(e)), None)
            if before is None:
                x = (after["epoch"] if after else 0) - 0.5
            elif after is None:
                x = before["epoch"] + 0.5
            else:
                t0, t, t1 = _time(before), _time(entry), _time(after)
                share = 0.5
                if t0 and t and t1 and t1 > t0:
                    share = min(1.0, max(0.0, (t - t0) / (t1 - t0)))
                x = before["epoch"] + (after["epoch"] - before["epoch"]) * share
            placed.append((x, entry))
    return placed


@dataclass
class RunRow:
    """One run under a storage location, for :func:`runs_table`."""

    name: str
    epochs: int | None
    latest: checkpoint.Checkpoint | None


def list_runs(storage: Folder) -> list[RunRow]:
    """Every folder directly under ``storage`` that holds a ``metrics.jsonl`` or ``ckpt-*``
    folders, with its epochs recorded and latest verified checkpoint."""
    rows = []
    for name in storage.folders():
        run = storage.child(name)
        has_metrics = run.exists(METRICS)
        if not has_metrics and not checkpoint.checkpoint_names(run):
            continue
        epochs = None
        if has_metrics:
            try:
                text = run.read(METRICS, limit=METRICS_MAX_BYTES).decode(errors="replace")
            except Refused as err:
                log.warning("%s", err)
            else:
                epochs = len({e["epoch"] for e in parse_metrics(text) if _is_epoch(e)})
        rows.append(RunRow(name, epochs, checkpoint.latest(run)))
    return rows


def runs_table(rows: list[RunRow]) -> str:
    """The runs as an aligned table."""
    header = ("RUN", "EPOCHS", "LATEST CHECKPOINT", "EPOCH", "BATCH", "STEP", "TIME (UTC)")
    table = [header]
    for row in rows:
        epochs = "-" if row.epochs is None else str(row.epochs)
        ckpt = row.latest
        if ckpt is None:
            table.append((row.name, epochs, "no committed checkpoint"))
        else:
            table.append(
                (
                    row.name, epochs, ckpt.name, str(ckpt.epoch), str(ckpt.batch),
                    str(ckpt.global_step), str(ckpt.manifest.get("time", "?")),
                )
            )  # fmt: skip
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table)


def default_output(run: RunRecord) -> str:
    """Where ``report`` writes the PNG unless told: into a local run folder, else
    ``./<name>-report.png``."""
    location = run.folder.location
    if not is_uri(location) or urlsplit(location).scheme == "file":
        return run.folder.uri("report.png")
    return f"./{run.name}-report.png"
