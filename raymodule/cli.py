"""The ``raymodule`` command: look at runs that ``fit(..., run=RunConfig(...))`` wrote.

    raymodule report RUN_DIR [--output PNG]   summary of one run, and a PNG of its curves
    raymodule runs STORAGE                    the runs under a storage location

RUN_DIR and STORAGE are local paths or URIs (``s3://bucket/runs?endpoint_override=...``), read
through :mod:`raymodule.storage`. Bad input (no such run, an unknown scheme, storage that
cannot be reached) is said in words on stderr with exit code 2. ``python -m raymodule.cli``
is the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

__all__ = ["main"]

_EPILOG = """\
RUN_DIR is <storage>/<name>, the folder RunConfig(name=..., storage=...) trains in; STORAGE is
the RunConfig's storage. Both take a local path or a URI that pyarrow understands, e.g.
  raymodule runs ./raymodule_runs
  raymodule report ./raymodule_runs/digits
  raymodule report 's3://bucket/runs/digits?endpoint_override=127.0.0.1:9000&scheme=http'
S3 keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and are never printed.
Exit codes: 0 done, 2 bad input or storage that cannot be read (the reason is printed).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymodule",
        description="Look at the runs that raymodule's fit(..., run=RunConfig(...)) wrote: what\n"
        "a run trained, how fast, on how many workers, and which checkpoint it resumes from.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    rep = commands.add_parser(
        "report",
        help="summarize one run and draw its curves to a PNG",
        description="Print a run's summary (epochs, steps, final and best metrics, throughput,\n"
        "world size, checkpoints and their write time, the latest verified checkpoint, resume\n"
        "points) and write a PNG of its training curves, throughput per epoch and world size.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder: a local path or URI")
    rep.add_argument(
        "--output",
        "-o",
        metavar="PNG",
        help="where to write the PNG, a local path or URI (default: RUN_DIR/report.png for a "
        "local run, ./<name>-report.png for a run in object storage)",
    )
    runs = commands.add_parser(
        "runs",
        help="list the runs under a storage location with their latest checkpoints",
        description="List every run under STORAGE (each folder holding metrics.jsonl or ckpt-*\n"
        "folders) with its recorded epochs and its latest checkpoint that verifies against its\n"
        "manifest.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    runs.add_argument("storage", metavar="STORAGE", help="a local path or URI")
    return parser


class _BadInput(Exception):
    """What the user gave cannot be read as asked; the message says why."""


@contextlib.contextmanager
def _reading():
    """Storage errors (OSError, and ValueError for a location that is no storage location:
    both name the redacted location) and what :mod:`raymodule.report` finds wrong with a run
    become :class:`_BadInput`; the drawing stays outside, so a bug there is not taken for bad
    input."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise _BadInput(str(err)) from None


# the commands import storage (pyarrow) and report (ray) when they run, so --help is instant


def _report(args) -> int:
    from . import report
    from .storage import is_uri, redact, write_bytes

    with _reading():
        run = report.load_run(args.run_dir)
    print(report.summary(run))
    png = report.plot(run)
    output = args.output or report.default_output(run)
    if not is_uri(output):
        output = os.path.abspath(output)
    with _reading():
        write_bytes(output, png)
    print(f"report written to {redact(output)}")
    return 0


def _runs(args) -> int:
    from . import report
    from .storage import Folder

    with _reading():
        storage = Folder(args.storage)
        if not storage.exists(""):
            raise ValueError(f"nothing at {storage}: there is no such folder")
        rows = report.list_runs(storage)
    if not rows:
        print(f"no runs under {storage} (no folder in it holds metrics.jsonl or ckpt-*)")
        return 0
    print(f"runs under {storage}:")
    print(report.runs_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="raymodule: warning: %(message)s")
    try:
        return {"report": _report, "runs": _runs}[args.command](args)
    except _BadInput as err:
        print(f"raymodule {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
