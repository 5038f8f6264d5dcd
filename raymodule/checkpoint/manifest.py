"""A checkpoint's manifest: what it records, and reading a checkpoint without trusting it.

A run folder may hold anything: files written by another version, damaged by a failed write,
or crafted. So a reader takes nothing on faith. The manifest is a JSON object of bounded size
whose ``files`` maps plain names inside the checkpoint folder (``model-symbol.json``; no ``/``
at the start, no empty, ``.`` or ``..`` parts, no backslash) to ``{"size": int, "sha256":
hex}``; each file is read only if it is a regular file inside the folder, never more bytes
than the manifest gives, and must match both. What a resume is checked against (see
:mod:`raymodule.checkpoint.continuity`), when recorded, must be of its type: ``params`` an object of
shapes (lists of integers >= 0) by name, ``batch_size`` and ``batches_per_epoch`` integers >= 1
or null. Anything else is rejected with a ``CheckpointError`` that names the file or field and
what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

from ..errors import CheckpointError
from ..storage import Folder, Refused, TooLarge, unsafe_name

__all__ = ["FORMAT", "MANIFEST", "MAX_BYTES", "Uncommitted", "load", "make", "verified_files"]

FORMAT = 1
MANIFEST = "manifest.json"
MAX_BYTES = 16 * 1024**2
"""The largest manifest read (one lists a few files: kilobytes)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COUNTS = ("epoch", "batch", "global_step")


class Uncommitted(CheckpointError):
    """A checkpoint folder without a manifest: its write was interrupted before the commit."""


def make(
    files: dict[str, bytes], info: dict, optimizer: dict, params: dict, versions: dict
) -> dict:
    """The manifest of a checkpoint holding ``files`` and parameters of the shapes ``params``
    (see :func:`raymodule.checkpoint.write` for ``info``)."""
    return {
        "format": FORMAT,
        "files": {
            file: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for file, data in files.items()
        },
        "epoch": info["epoch"],
        "batch": info["batch"],
        "global_step": info["global_step"],
        "world_size": info["world_size"],
        "work_load_list": info["work_load_list"],
        "params": params,
        "batch_size": info.get("batch_size"),
        "batches_per_epoch": info.get("batches_per_epoch"),
        "optimizer": {
            "type": optimizer.get("type"),
            "num_update": optimizer.get("num_update"),
            "hyperparameters": optimizer.get("hyperparameters"),
        },
        "versions": versions,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def load(run: Folder, name: str) -> dict:
    """The manifest of checkpoint ``name`` in ``run``, checked to be one this raymodule
    reads; raises ``CheckpointError`` saying what is wrong."""
    where = f"{run}/{name}/{MANIFEST}"
    try:
        manifest = json.loads(run.read(f"{name}/{MANIFEST}", limit=MAX_BYTES))
    except FileNotFoundError:
        raise Uncommitted(f"{run}/{name} has no {MANIFEST}: it was never committed") from None
    except Refused as err:
        raise CheckpointError(f"{where} is not read: {err}") from None
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, or nested too deep
        raise CheckpointError(f"{where} is not a valid manifest: {err}") from None
    problem = _problem(manifest)
    if problem is not None:
        raise CheckpointError(f"{where} is not a valid manifest: {problem}")
    return manifest


def _problem(manifest) -> str | None:
    """What makes ``manifest`` one this raymodule does not read, or None."""
    if not isinstance(manifest, dict):
        return f"it holds a {type(manifest).__name__}, not an object"
    if manifest.get("format") != FORMAT:
        return f"it has format {manifest.get('format')!r}; this raymodule reads format {FORMAT}"
    for key in _COUNTS:
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key!r} is {value!r}, not an integer >= 0"
    for key in ("batch_size", "batches_per_epoch"):
        value = manifest.get(key)
        if value is not None and not (_is_int(value) and value >= 1):
            return f"{key!r} is {value!r}, not an integer >= 1 or null"
    params = manifest.get("params", {})
    if not isinstance(params, dict) or not all(_is_shape(s) for s in params.values()):
        return "'params' is not an object of shapes (lists of integers >= 0) by name"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"'files' is a {type(files).__name__}, not an object of files by name"
    for file, entry in files.items():
        why = unsafe_name(file)
        if why is not None:
            return f"it names the file {file!r}, which is not a plain name in its folder: {why}"
        if not isinstance(entry, dict):
            return f"the entry of {file!r} is a {type(entry).__name__}, not an object"
        size, sha256 = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"the size of {file!r} is {size!r}, not an integer >= 0"
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            return f"the sha256 of {file!r} is {sha256!r}, not 64 lowercase hex digits"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(shape) -> bool:
    return isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)


def verified_files(run: Folder, name: str, manifest: dict) -> dict[str, bytes]:
    """The files a :func:`load`-ed ``manifest`` lists, each read within its size and checked
    against its sha256; raises ``CheckpointError`` naming the first that does not match."""
    files = {}
    for file, expected in manifest["files"].items():
        where = f"{run}/{name}/{file}"
        size = expected["size"]
        try:
            data = run.read(f"{name}/{file}", limit=size)
        except FileNotFoundError:
            raise CheckpointError(f"{where} is missing") from None
        except TooLarge:
            raise CheckpointError(
                f"{where} has more bytes than the {size} the manifest says (overwritten)"
            ) from None
        except Refused as err:
            raise CheckpointError(f"{where} is not read: {err}") from None
        if len(data) != size:
            raise CheckpointError(
                f"{where} has {len(data)} bytes where the manifest says {size} "
                "(truncated or overwritten)"
            )
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(f"{where} does not match the sha256 in the manifest (corrupted)")
        files[file] = data
    return files
