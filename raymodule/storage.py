"""Files by local path or URI: the one place raymodule reads and writes storage.

A location is a local path (made absolute) or any URI that ``pyarrow.fs.FileSystem.from_uri``
accepts, query options included (``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``).
Local paths take the same code path as remote URIs, but for two things pyarrow does not do:
a local write is synced (file, then folder) before it returns, and a local read opens only a
regular file inside its folder, without blocking on a FIFO or following a link. A local write
that fails removes its half-written ``<name>.part-<pid>-<thread>`` file; one that a killed
process left stays (nothing tells it from another process's write in progress). Names inside
a folder are plain relative names (no ``..``); reads are bounded when the caller gives a size.
File suffixes go on a URI's path, never into its query, and URIs are redacted wherever they
are printed, in pyarrow's messages too.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import errno
import functools
import os
import re
import stat
import threading
from urllib.parse import parse_qsl, unquote, unquote_plus, urlencode, urlsplit, urlunsplit

import pyarrow
import pyarrow.fs as pafs

__all__ = [
    "Folder",
    "Refused",
    "TooLarge",
    "credentials_in",
    "is_uri",
    "open_for_reads",
    "read_bytes",
    "redact",
    "unsafe_name",
    "with_suffix",
    "write_bytes",
]

# object stores need no folders before a write, and make each written object appear whole
_OBJECT_STORES = tuple(
    getattr(pafs, name) for name in ("S3FileSystem", "GcsFileSystem") if hasattr(pafs, name)
)
_SECRET_KEYS = re.compile(r"(secret|token|password|key|credential)", re.I)
# tries per object-store request when a location is checked: an S3 server that is not there
# then fails the check in a second or two
CHECK_ATTEMPTS = 2
# files are read this many bytes at a time, so a bound on a file's size bounds the memory used
READ_CHUNK = 8 * 1024**2
# a filesystem made from a URI may read its credentials and settings from these variables
_STORAGE_ENV = ("AWS_", "GOOGLE_", "GCE_", "STORAGE_EMULATOR_HOST", "HADOOP_", "ARROW_")


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
    try:
        parts = urlsplit(location)
    except ValueError:  # not even a URL (a bad IPv6 host): show only its scheme
        return location.split("://", 1)[0] + "://***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = [(k, "***" if _SECRET_KEYS.search(k) else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*:")))


def credentials_in(location: str) -> list[str]:
    """The parts of ``location`` that hold credentials (a user part, query keys such as
    ``secret_key``), by name; empty for a local path or a URI without any."""
    location = str(location)
    if not is_uri(location):
        return []
    try:
        parts = urlsplit(location)
    except ValueError:
        return []
    found = ["user part"] if "@" in parts.netloc else []
    return found + [k for k, _ in parse_qsl(parts.query) if _SECRET_KEYS.search(k)]


def _scrub(text: str, location: str) -> str:
    """``text`` (a library's message about ``location``) with the credentials of ``location``
    hidden: pyarrow repeats a URI it cannot parse whole."""
    secrets = []
    try:
        parts = urlsplit(location)
        if "@" in parts.netloc:
            secrets.append(parts.netloc.rsplit("@", 1)[0])
        for raw in parts.query.split("&"):
            key, _, value = raw.partition("=")
            if value and _SECRET_KEYS.search(unquote(key)):
                secrets += [value, unquote_plus(value)]
    except ValueError:
        return "(the message repeats the location, so it is not shown)"
    text = text.replace(location, redact(location))
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _resolve(location: str, shown: str, region: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of ``location``; errors name ``shown`` (what the user gave).
    ``region``: an S3 URI's region when the URI does not name one (else pyarrow asks the
    bucket, over the network)."""
    try:
        if not is_uri(location):
            return pafs.LocalFileSystem(), os.path.abspath(location)
        parts = urlsplit(location)
        if parts.scheme != "s3" or any(key == "region" for key, _ in parse_qsl(parts.query)):
            region = None  # one key for the URI in the cache
        return _resolve_uri(location, _storage_environment(), region)
    except (pyarrow.ArrowInvalid, ValueError) as err:
        raise ValueError(
            f"{redact(shown)!r} is not a storage location raymodule can use: "
            f"{_scrub(str(err), location)} "
            "(use a local path or a URI such as file://, s3://, gs:// or hdfs://)"
        ) from None
    except OSError as err:  # S3 asked for a bucket's region, GCS or HDFS for credentials
        raise _failure("resolve", location, err) from None


def _storage_environment() -> tuple[tuple[str, str], ...]:
    """The environment variables a filesystem may take its credentials and settings from."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_STORAGE_ENV)))


@functools.lru_cache(maxsize=16)
def _resolve_uri(
    location: str, environment: tuple, region: str | None
) -> tuple[pafs.FileSystem, str]:
    """:func:`_resolve` of a URI, made once per process for the URI, the storage
    ``environment`` it is made in and ``region`` (pyarrow's filesystems may be used from
    several threads). Making an S3 filesystem costs about 11 ms of CPU (the AWS SDK reads the
    system's CA certificates), and every checkpoint's writer task gets the run's folder anew.
    The cache is emptied at exit, before pyarrow finalizes S3 (apache/arrow#50188: a
    filesystem alive then can hang the exit)."""
    parts = urlsplit(location)
    query = parse_qsl(parts.query)
    if region:  # added to the query as it is, which stays as the user wrote it
        added = urlencode({"region": region})
        location = urlunsplit(parts._replace(query=f"{parts.query}&{added}".lstrip("&")))
    fs, path = pafs.FileSystem.from_uri(location)
    if not any(key == "allow_delayed_open" for key, _ in query):
        fs = _with_options(fs, allow_delayed_open=True)
    return fs, path


atexit.register(_resolve_uri.cache_clear)


def _failure(action: str, location: str, err: Exception) -> OSError:
    detail = _scrub(str(err), location)
    return OSError(f"cannot {action} {redact(location)!r}: {type(err).__name__}: {detail}")


class Refused(OSError):
    """A file that is not read: not a regular file inside its folder, or too large."""


class TooLarge(Refused):
    """A file holds more bytes than its reader allows."""


def unsafe_name(name: str) -> str | None:
    """Why ``name`` is not a plain relative name inside a folder (``a/b.json``: no ``/`` at
    the start or the end, no empty, ``.`` or ``..`` parts, no backslash or control
    character), or None when it is one."""
    if not isinstance(name, str) or not name:
        return "it is not a non-empty string"
    if any(ord(c) < 32 or c == "\\" for c in name):
        return "it holds a backslash or a control character"
    if name.startswith("/"):
        return "it starts with '/'"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "it has an empty, '.' or '..' part"
    return None


class Folder:
    """A folder at a local path or URI, its filesystem resolved once.

    Names inside it are plain relative names (``ckpt-0000000050/manifest.json``); every error
    names the redacted location it was about. A process makes a URI's filesystem once (for the
    same storage variables in its environment); a Folder pickles as its location, and for S3
    the region it resolved to (``region``: used when the URI names none).
    """

    def __init__(self, location: str, *, shown: str | None = None, region: str | None = None):
        location = str(location)
        self.location = location if is_uri(location) else os.path.abspath(location)
        self._fs, self._path = _resolve(self.location, shown or location, region)
        self._path = self._path.rstrip("/")

    def __repr__(self) -> str:
        return f"Folder({redact(self.location)!r})"

    def __reduce__(self):
        # its location, resolved again where it is loaded (through that process's cache), and
        # for S3 the region it resolved to: it is not asked again there
        return _loaded_folder, (self.location, getattr(self._fs, "region", None))

    def __str__(self) -> str:
        return redact(self.location)

    @property
    def on_this_machine(self) -> bool:
        """Whether the folder is on this machine's filesystem (a path or ``file://``), not
        in an object store or a distributed filesystem every node reaches."""
        return isinstance(self._fs, pafs.LocalFileSystem)

    def uri(self, name: str = "") -> str:
        """The location of ``name`` in this folder (its query options kept)."""
        return with_suffix(self.location, "/" + name) if name else self.location

    def child(self, name: str) -> Folder:
        return Folder(self.uri(name))

    def _full(self, name: str) -> str:
        if not name:
            return self._path
        why = unsafe_name(name)
        if why is not None:
            raise ValueError(f"{name!r} is not a plain name inside {self}: {why}")
        return f"{self._path}/{name}"

    def write(self, name: str, data: bytes) -> None:
        """Writes the file ``name``, creating the folders it needs. The file appears whole or
        not at all: object stores do that themselves, a local file is written aside and
        renamed. A local file is durable when this returns (it and the folders it is in, up to
        this one, are synced), so what is written after it never survives without it."""
        path = self._full(name)
        try:
            if isinstance(self._fs, _OBJECT_STORES):  # no folders to make: one PUT
                with self._fs.open_output_stream(path) as out:
                    out.write(data)
                return
            if isinstance(self._fs, pafs.LocalFileSystem):
                self._write_local(path, data)
                return
            self._fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self._fs.open_output_stream(path) as out:
                out.write(data)
        except OSError as err:
            raise _failure("write", self.uri(name), err) from None

    def _write_local(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        part = f"{path}.part-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(part, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(part, path)
        except BaseException:  # no half left behind; one a killed process leaves stays
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
        folder = os.path.dirname(path)
        while True:  # the new name, and any folder made for it, are durable too
            _fsync_folder(folder)
            if len(folder) <= len(self._path):
                break
            folder = os.path.dirname(folder)

    def read(self, name: str, limit: int | None = None, *, follow_links: bool = False) -> bytes:
        """The contents of the regular file ``name``, read in bounded chunks. ``limit`` bounds
        its size: a larger file raises :class:`TooLarge` before it is read. Anything but a
        regular file inside this folder (a device, a FIFO, a symbolic link unless
        ``follow_links``) raises :class:`Refused` without being opened for reading."""
        path = self._full(name)
        try:
            if isinstance(self._fs, pafs.LocalFileSystem):
                return self._read_local(name, path, limit, follow_links)
            # an object store holds no links, devices or FIFOs: the chunks alone bound the read
            with self._fs.open_input_stream(path) as source:
                return _read_chunks(source.read, name, limit, self)
        except FileNotFoundError:
            raise FileNotFoundError(f"no file at {redact(self.uri(name))!r}") from None
        except Refused:
            raise
        except OSError as err:
            raise _failure("read", self.uri(name), err) from None

    def _read_local(self, name: str, path: str, limit: int | None, follow_links: bool) -> bytes:
        inside = os.path.realpath(self._path) + os.sep
        real = os.path.realpath(os.path.dirname(path)) + os.sep
        if not follow_links and not real.startswith(inside):
            raise Refused(f"{redact(self.uri(name))!r} is not inside {self}")
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO does not block the open
        try:
            fd = os.open(path, flags if follow_links else flags | os.O_NOFOLLOW)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise Refused(f"{redact(self.uri(name))!r} is a symbolic link") from None
            raise
        with os.fdopen(fd, "rb", buffering=0) as source:
            info = os.fstat(source.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise Refused(f"{redact(self.uri(name))!r} is not a regular file")
            self._check_size(name, info.st_size, limit)
            return _read_chunks(source.read, name, limit, self)

    def _check_size(self, name: str, size: int, limit: int | None) -> None:
        if limit is not None and size > limit:
            raise TooLarge(
                f"{redact(self.uri(name))!r} holds {size} bytes, more than the {limit} allowed"
            )

    def sizes(self, name: str = "") -> dict[str, int]:
        """Every file under ``name``, by its name relative to that folder, with its size;
        empty when there is no such folder."""
        base = self._full(name)
        try:
            infos = self._fs.get_file_info(
                pafs.FileSelector(base, recursive=True, allow_not_found=True)
            )
        except OSError as err:
            raise _failure("list", self.uri(name), err) from None
        return {
            info.path[len(base) + 1 :]: info.size
            for info in infos
            if info.type == pafs.FileType.File
        }

    def folders(self) -> list[str]:
        """The names of the folders directly inside this one."""
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(self._path, allow_not_found=True))
        except OSError as err:
            raise _failure("list", self.location, err) from None
        return sorted(
            info.path.rsplit("/", 1)[-1] for info in infos if info.type == pafs.FileType.Directory
        )

    def exists(self, name: str) -> bool:
        try:
            return self._fs.get_file_info(self._full(name)).type != pafs.FileType.NotFound
        except OSError as err:
            raise _failure("look at", self.uri(name), err) from None

    def delete_folder(self, name: str) -> None:
        """Deletes the folder ``name`` and all it holds; a missing one is not an error."""
        try:
            self._fs.delete_dir(self._full(name))
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _failure("delete", self.uri(name), err) from None

    def delete(self, name: str) -> None:
        """Deletes the file or folder ``name``; a missing one is not an error."""
        path = self._full(name)
        try:
            kind = self._fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                self._fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                self._fs.delete_file(path)
        except OSError as err:
            raise _failure("delete", self.uri(name), err) from None

    def check_writable(self) -> None:
        """Writes and deletes a small file, so that a location that cannot be used fails now,
        with its cause, rather than at the first checkpoint.

        Requests to an object store are tried at most :data:`CHECK_ATTEMPTS` times here: by
        default an S3 filesystem made from a URI retries a refused connection for about six
        seconds per request, so a server that is not there would take many seconds to say so.
        Checkpoints keep the filesystem's own retries."""
        probe = f".raymodule-probe-{os.getpid()}"
        quick = copy.copy(self)
        quick._fs = _with_few_retries(self._fs)
        try:  # a missing bucket is found here, or created if the URI allows it
            quick._fs.create_dir(self._path, recursive=True)
        except OSError as err:
            raise _failure("create", self.location, err) from None
        quick.write(probe, b"")
        quick.delete(probe)


def _loaded_folder(location: str, region: str | None) -> Folder:
    """A pickled :class:`Folder`, loaded."""
    return Folder(location, region=region)


def _read_chunks(read, name: str, limit: int | None, folder: Folder) -> bytes:
    """All that ``read(n)`` gives until the end, but no more than ``limit`` bytes."""
    chunks, total = [], 0
    while True:
        chunk = read(READ_CHUNK if limit is None else min(READ_CHUNK, limit - total + 1))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if limit is not None and total > limit:
            raise TooLarge(
                f"{redact(folder.uri(name))!r} holds more than the {limit} bytes allowed"
            )


def _fsync_folder(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _with_few_retries(fs: pafs.FileSystem) -> pafs.FileSystem:
    """``fs`` itself, or for S3 the same filesystem (endpoint, region, keys, options) trying
    each request at most :data:`CHECK_ATTEMPTS` times."""
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=CHECK_ATTEMPTS)
    return _with_options(fs, retry_strategy=retry)


def _with_options(fs: pafs.FileSystem, **changed) -> pafs.FileSystem:
    """``fs`` itself, or for S3 the same filesystem (endpoint, region, keys, options) with the
    S3 options ``changed``.

    raymodule sets ``allow_delayed_open`` on the S3 filesystems it resolves (unless the URI
    says otherwise): a file smaller than a multipart part is then written with one PutObject
    instead of three requests (create, part, complete). A checkpoint writes six files, so
    that is 12 requests less each (``tests/test_storage.py`` counts them). A write
    that fails still raises from :meth:`Folder.write`, at the close rather than the open."""
    s3 = getattr(pafs, "S3FileSystem", None)  # absent from pyarrow builds without S3
    if s3 is None or not isinstance(fs, s3):
        return fs
    _, (options,) = fs.__reduce__()  # the options it was made with, as keyword arguments
    return s3(**dict(options, **changed))


def _split_file(location: str) -> tuple[Folder, str]:
    location = str(location)
    if not is_uri(location):
        location = os.path.abspath(location)
    parts = urlsplit(location)
    folder, name = parts.path.rsplit("/", 1)
    return Folder(urlunsplit(parts._replace(path=folder)), shown=location), name


def write_bytes(location: str, data: bytes) -> None:
    """Writes ``data`` to the file at ``location``, creating its parent folders."""
    folder, name = _split_file(location)
    folder.write(name, data)


def read_bytes(location: str, limit: int | None = None) -> bytes:
    """The contents of the file at ``location`` (which the caller names: links are followed);
    a file of more than ``limit`` bytes raises :class:`TooLarge`."""
    folder, name = _split_file(location)
    return folder.read(name, limit, follow_links=True)


def open_for_reads(location: str) -> pyarrow.NativeFile:
    """The file at ``location`` opened for reads at any offset (``read_at(nbytes, offset)``,
    ``size()``), as a pyarrow random-access file; a missing file raises FileNotFoundError
    and any other failure OSError, each naming the redacted location."""
    location = str(location)
    fs, path = _resolve(location, location)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no file at {redact(location)!r}") from None
    except OSError as err:
        raise _failure("open", location, err) from None
