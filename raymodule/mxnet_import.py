"""Importing MXNet in raymodule's workers: without scikit-learn and scipy.stats, and with its
operators' generated wrappers compiled once per machine instead of once per process.

MXNet 1.9's ``mxnet.model`` imports scikit-learn, when it is installed, only to make the
deprecated ``FeedForward`` an sklearn estimator; ``mxnet.contrib.quantization`` and
``mxnet.test_utils`` import scipy.stats, when scipy is installed, for INT8 calibration and
tests. With what they pull in (pandas among them), that is 0.55 s of CPU and 110 MB of memory
in every process that imports MXNet (1.50 s and 260 MB in all), and these processes use none of
it. Each is hidden while MXNet loads, and only then (MXNet allows each to be missing): code
that runs in these processes afterwards (a user's metric, an initializer) imports them as
usual. The user's own process imports MXNet as it always does.

MXNet also writes the Python source of a wrapper for each of its operators as it loads
(``mxnet.ndarray.register`` and ``mxnet.symbol.register``: some 2,300 of them, the ``mx.nd``,
``mx.sym`` and ``mx.np`` functions) and compiles each with ``exec``: a third of the 1.0 s of CPU
importing MXNet takes here. The sources are the same in every process but for the operator's
handle, an address written into each. So while MXNet loads in a worker, the two modules'
``exec`` compiles each source once with a placeholder of the handle's length for the handle,
keeps the code in a file of the machine's cache folder, and in later processes puts their handle
in the kept code: the code object is the one ``exec`` compiles from the source, column positions
and all. The folder is ``RAYMODULE_MXNET_CACHE_DIR``, read on each node (by default
``$XDG_CACHE_HOME/raymodule``, else ``~/.cache/raymodule``; empty: none). A file that cannot be
read or written costs only the compiling; a save cut short (its process killed) leaves a
temporary file, which a later save removes once it is an hour old.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import marshal
import os
import re
import sys
import tempfile
import time
import types
from pathlib import Path

__all__ = ["import_mxnet"]

log = logging.getLogger(__name__)

_HIDDEN = ("sklearn", "scipy.stats")  # imported by MXNet for what its workers never run
_REGISTERS = ("mxnet.ndarray.register", "mxnet.symbol.register")  # they exec the wrappers
CACHE_ENV = "RAYMODULE_MXNET_CACHE_DIR"
# the handle in the call each wrapper ends with: _imperative_invoke(<handle>, ...
_HANDLE = re.compile(r"(_imperative_invoke\(|_symbol_creator\()(\d+),")  # a \b first: 25x slower
# a temporary file this old was left by a process killed as it saved (a save takes a second)
_LEFT_OVER_S = 3600.0


def import_mxnet() -> None:
    """Imports MXNet, scikit-learn and scipy.stats hidden meanwhile, its operators' wrappers
    compiled through :class:`OpCode` (nothing, when MXNet is already imported)."""
    if "mxnet" in sys.modules:
        return
    # `import sklearn` (`from scipy import stats`) then raises ImportError, which MXNet allows
    hidden = [name for name in _HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    folder = cache_dir()
    finder = None if folder is None else _RegisterFinder(OpCode(folder))
    if finder is not None:
        sys.meta_path.insert(0, finder)
    try:
        import mxnet  # noqa: F401
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
            for name in _REGISTERS:  # later calls (a library's operators) are MXNet's own
                module = sys.modules.get(name)
                if module is not None:
                    vars(module).pop("exec", None)
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    if finder is not None:
        finder.codes.save()


def cache_dir() -> Path | None:
    """Where this machine keeps MXNet's compiled wrappers, or None (``RAYMODULE_MXNET_CACHE_DIR``
    set empty)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return Path(chosen) if chosen else None
    if os.environ.get("XDG_CACHE_HOME", "").startswith("/"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "raymodule"
    try:
        return Path.home() / ".cache" / "raymodule"
    except RuntimeError:  # no home to be found
        return None


class OpCode:
    """Code objects for MXNet's generated wrapper sources, kept in ``folder`` between
    processes: ``code(source)`` is ``compile(source, "<string>", "exec")`` as ``exec`` makes
    it in MXNet's modules, from the file when a process compiled the same source before (its
    handle aside), and :meth:`save` writes what this process used, when it compiled any."""

    def __init__(self, folder: Path):
        # one file per bytecode format: another Python's code objects are not read
        name = f"mxnet-ops-{sys.implementation.cache_tag}-{importlib.util.MAGIC_NUMBER.hex()}"
        self.path = folder / f"{name}.marshal"
        self.kept = self._read()
        self.used: dict[bytes, types.CodeType] = {}
        self.hits = self.compiled = 0

    def _read(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                kept = marshal.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, EOFError, ValueError, TypeError) as err:  # rewritten by save()
            log.debug("MXNet's kept wrappers in %s not read: %s", self.path, err)
            return {}
        return kept if isinstance(kept, dict) else {}

    def code(self, source: str) -> types.CodeType:
        handles = {digits for _, digits in _HANDLE.findall(source)}
        if len(handles) > 1:  # not one of the wrappers this reads: compiled as it is
            return _compile(source)
        handle = handles.pop() if handles else None
        template = source
        if handle is not None:
            # of the handle's length: the code's column positions are those of the source
            placeholder = str(10 ** (len(handle) - 1) + 1)
            if placeholder in source:
                return _compile(source)
            template = _HANDLE.sub(rf"\g<1>{placeholder},", source)
        key = hashlib.blake2b(template.encode(), digest_size=16).digest()
        kept = self.kept.get(key)
        if not isinstance(kept, types.CodeType):
            kept = _compile(template)
            self.compiled += 1
        else:
            self.hits += 1
        self.used[key] = kept
        return kept if handle is None else _put_handle(kept, int(placeholder), int(handle))

    def save(self) -> None:
        """Writes the code this process used (so the file holds one MXNet's wrappers, not every
        version's), if it compiled any; atomically: a process reading meanwhile reads the last
        whole file."""
        if not self.compiled:
            return
        written = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._remove_left_over()
            with tempfile.NamedTemporaryFile(
                dir=self.path.parent, prefix=f"{self.path.name}.", suffix=".tmp", delete=False
            ) as f:
                written = f.name
                marshal.dump(self.used, f)
            os.replace(written, self.path)
            written = None
        except OSError as err:
            log.debug("MXNet's compiled wrappers not kept in %s: %s", self.path, err)
        finally:  # on any error, no temporary file stays beside the kept one
            if written is not None:
                with contextlib.suppress(OSError):
                    os.unlink(written)

    def _remove_left_over(self) -> None:
        """Removes the temporary files of saves that never ended (a process killed meanwhile,
        on this node or another sharing the folder): those older than an hour."""
        for left in self.path.parent.glob(f"{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):  # another process removed it meanwhile
                if time.time() - left.stat().st_mtime > _LEFT_OVER_S:
                    left.unlink()


def _compile(source: str) -> types.CodeType:
    # as exec compiles a string in MXNet's modules: no future flags of this module's
    return compile(source, "<string>", "exec", dont_inherit=True)


def _put_handle(code: types.CodeType, placeholder: int, handle: int) -> types.CodeType:
    consts = tuple(
        handle
        if type(c) is int and c == placeholder
        else _put_handle(c, placeholder, handle)
        if isinstance(c, types.CodeType)
        else c
        for c in code.co_consts
    )
    return code.replace(co_consts=consts)


class _RegisterFinder(importlib.abc.MetaPathFinder):
    """Loads MXNet's two register modules with ``exec`` in their globals compiling through
    ``codes``: the name MXNet's ``_make_ndarray_function`` and ``_make_symbol_function`` call."""

    def __init__(self, codes: OpCode):
        self.codes = codes

    def find_spec(self, name, path, target=None):
        if name not in _REGISTERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _WithExec(spec.loader, self._exec)
        return spec

    def _exec(self, source, globals=None, locals=None):
        if globals is None:  # exec's own default: the caller's (MXNet's module's) globals
            globals = sys._getframe(1).f_globals
        if isinstance(source, str):
            source = self.codes.code(source)
        return builtins.exec(source, globals, locals)


class _WithExec(importlib.abc.Loader):
    def __init__(self, loader, exec_):
        self.loader = loader
        self.exec_ = exec_

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__dict__["exec"] = self.exec_
        try:
            self.loader.exec_module(module)
        finally:  # the module's loader is MXNet's own again (its source, for tracebacks)
            module.__loader__ = module.__spec__.loader = self.loader
