"""How raymodule's workers import MXNet (raymodule/mxnet_import.py), in fresh processes: without
scikit-learn and scipy.stats, and with MXNet's operator wrappers compiled once per machine,
to the code MXNet compiles itself."""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
import time

import pytest

from raymodule.mxnet_import import CACHE_ENV, OpCode

IMPORT = (
    "import sys; from raymodule.mxnet_import import import_mxnet; import_mxnet(); import mxnet\n"
    "registers = [sys.modules[n] for n in ('mxnet.ndarray.register', 'mxnet.symbol.register')]\n"
    "assert not any('exec' in vars(m) for m in registers), 'builtin exec again'\n"
    "assert all(type(m.__loader__).__name__ == 'SourceFileLoader' for m in registers)\n"
    "fc = mxnet.sym.FullyConnected(mxnet.sym.var('x'), num_hidden=3)\n"
    "print(mxnet.nd.ones((2, 3)).sum().asscalar(), fc.infer_shape(x=(2, 4))[1],"
    " float(mxnet.np.ones((4,)).sum()))\n"
)
WORKS = "6.0 [(2, 3)] 4.0"


def run_python(code: str, **env) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_raymodules_processes_import_mxnet_without_sklearn_or_scipy_stats_which_stay_importable():
    """Workers import MXNet with scikit-learn and scipy.stats hidden (MXNet loads them for the
    deprecated FeedForward, INT8 calibration and its tests only); a user's code there can
    import them afterwards."""
    code = (
        "import sys; from raymodule.mxnet_import import import_mxnet; import_mxnet(); "
        "import mxnet; print('sklearn' in sys.modules, 'scipy.stats' in sys.modules, "
        "mxnet.model.BASE_ESTIMATOR is object, mxnet.contrib.quantization.stats is None); "
        "import sklearn.base, scipy.stats; "
        "print('sklearn' in sys.modules, scipy.stats.norm.cdf(0) == 0.5)"
    )
    out = run_python(code)
    assert out.split() == ["False"] * 2 + ["True"] * 4, out


def test_the_wrappers_are_compiled_by_the_first_process_and_read_by_the_next(tmp_path):
    """The first import on a machine compiles MXNet's wrappers and keeps them; the next reads
    them and writes nothing; both processes' MXNet works. A damaged file is only compiled
    again, and no folder at all (the variable set empty) keeps nothing."""
    folder = tmp_path / "cache"
    assert run_python(IMPORT, **{CACHE_ENV: str(folder)}) == WORKS
    (kept,) = folder.iterdir()
    written = kept.stat().st_mtime_ns, kept.read_bytes()
    assert len(written[1]) > 1_000_000  # some 2,300 wrappers
    assert run_python(IMPORT, **{CACHE_ENV: str(folder)}) == WORKS
    assert (kept.stat().st_mtime_ns, kept.read_bytes()) == written, "read, not written again"

    kept.write_bytes(written[1][: len(written[1]) // 2])  # cut short, as by a full disk
    assert run_python(IMPORT, **{CACHE_ENV: str(folder)}) == WORKS
    assert marshal.loads(kept.read_bytes()).keys() == marshal.loads(written[1]).keys()
    assert [p.name for p in folder.iterdir()] == [kept.name], "no temporary file left"

    home = tmp_path / "home"
    home.mkdir()
    env = {CACHE_ENV: "", "HOME": str(home), "XDG_CACHE_HOME": str(home / "xdg")}
    assert run_python(IMPORT, **env) == WORKS
    assert not any(home.iterdir())


def mxnets_wrapper_sources() -> list[str]:
    """The source MXNet writes for each operator's NDArray and Symbol wrapper, as it loads."""
    import ctypes

    from mxnet.base import _LIB, OpHandle, c_str, check_call, py_str
    from mxnet.ndarray.register import _generate_ndarray_function_code
    from mxnet.symbol.register import _generate_symbol_function_code

    names = ctypes.POINTER(ctypes.c_char_p)()
    count = ctypes.c_uint()
    check_call(_LIB.MXListAllOpNames(ctypes.byref(count), ctypes.byref(names)))
    sources = []
    for name in [py_str(names[i]) for i in range(count.value)]:  # read before the next call
        handle = OpHandle()
        check_call(_LIB.NNGetOpHandle(c_str(name), ctypes.byref(handle)))
        for generate in (_generate_ndarray_function_code, _generate_symbol_function_code):
            sources.append(generate(handle, name, name)[0])
    return sources


def test_kept_wrappers_are_the_code_mxnet_compiles_for_each_operators_handle(tmp_path):
    """Each wrapper's code, compiled or read back with this process's handle put in, equals
    what ``exec`` compiles from MXNet's source, column positions too; the same source with
    another handle of as many digits is read back, with that handle in its code."""
    sources = mxnets_wrapper_sources()
    assert len(sources) > 2000

    def compiled(source):
        return compile(source, "<string>", "exec", dont_inherit=True)

    first = OpCode(tmp_path)
    assert all(first.code(s) == compiled(s) for s in sources)
    assert first.hits == 0
    first.save()
    again = OpCode(tmp_path)
    assert all(again.code(s) == compiled(s) for s in sources)
    assert (again.hits, again.compiled) == (len(sources), 0)

    source = next(s for s in sources if "_imperative_invoke(" in s)
    handle = source.split("_imperative_invoke(")[1].split(",")[0]
    other = source.replace(
        f"_imperative_invoke({handle},", f"_imperative_invoke({int(handle) + 8},"
    )
    assert again.code(other) == compiled(other) != compiled(source)
    assert again.compiled == 0, "read back with the other handle put in"
    shorter = source.replace(f"_imperative_invoke({handle},", "_imperative_invoke(12345,")
    assert again.code(shorter) == compiled(shorter)


def test_a_save_removes_temporary_files_left_by_saves_that_never_ended(tmp_path):
    """A process killed as it saved leaves its temporary file: the next save removes it once
    it is an hour old, and leaves a younger one (a save going on, maybe on another node)."""
    codes = OpCode(tmp_path)
    codes.code("x = 1\n")
    old, young = (tmp_path / f"{codes.path.name}.{n}.tmp" for n in ("old", "young"))
    for left in (old, young):
        left.write_bytes(b"cut short")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    codes.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == [codes.path.name, young.name]


@pytest.mark.parametrize("handles", ["none", "two"])
def test_a_source_without_one_handle_is_compiled_as_it_is(tmp_path, handles):
    """Sources that are not one operator's wrapper get ``exec``'s code all the same."""
    source = {
        "none": "def f(x):\n    return x + 1\n",
        "two": "def f():\n    return _imperative_invoke(1, 0) + _imperative_invoke(2, 0)\n",
    }[handles]
    codes = OpCode(tmp_path)
    assert codes.code(source) == compile(source, "<string>", "exec", dont_inherit=True)
