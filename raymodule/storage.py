"""Files by local path or URI: the one place raymodule reads and writes storage.

A location is a local path (made absolute) or any URI that ``pyarrow.fs.FileSystem.from_uri``
accepts, query options included (``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``).
Local paths take the same code path as remote URIs. File suffixes go on a URI's path, never
into its query, and URIs are redacted wherever they are printed.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow
import pyarrow.fs as pafs

__all__ = ["is_uri", "with_suffix", "redact", "read_bytes", "write_bytes"]

_SECRET_KEYS = re.compile(r"(secret|token|password|key|credential)", re.I)


def is_uri(location: str) -> bool:
    return "://" in str(location)


def with_suffix(location: str, suffix: str) -> str:
    """``location`` with ``suffix`` appended to its path (``s3://b/m?x=1`` + ``-0001.params``
    is ``s3://b/m-0001.params?x=1``)."""
    location = str(location)
    if not is_uri(location):
        return location + suffix
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=parts.path + suffix))


def redact(location: str) -> str:
    """``location`` safe to print: credentials in the user part or the query are hidden."""
    location = str(location)
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = [(k, "***" if _SECRET_KEYS.search(k) else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*:")))


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    location = str(location)
    try:
        if not is_uri(location):
            return pafs.LocalFileSystem(), os.path.abspath(location)
        return pafs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, ValueError) as err:
        raise ValueError(
            f"{redact(location)!r} is not a storage location raymodule can use: {err} "
            "(use a local path or a URI such as file://, s3://, gs:// or hdfs://)"
        ) from None


def _failure(action: str, location: str, err: Exception) -> OSError:
    return OSError(f"cannot {action} {redact(location)!r}: {type(err).__name__}: {err}")


def write_bytes(location: str, data: bytes) -> None:
    """Writes ``data`` to the file at ``location``, creating its parent folders."""
    fs, path = _resolve(location)
    try:
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as err:
        raise _failure("write", location, err) from None


def read_bytes(location: str) -> bytes:
    """The contents of the file at ``location``."""
    fs, path = _resolve(location)
    try:
        with fs.open_input_stream(path) as source:
            return source.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no file at {redact(location)!r}") from None
    except OSError as err:
        raise _failure("read", location, err) from None
