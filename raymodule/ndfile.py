"""MXNet 1.9.1's NDArray file format (``mx.nd.save``), read without MXNet.

A file is a little-endian uint64 magic number (:data:`LIST_MAGIC`), a reserved uint64, the
count of arrays, each array as ``NDArray::Save`` writes it, and the names (a count, then each
name's length and bytes). A dense array saved outside NumPy shape semantics is a uint32 magic
(``NDARRAY_V2_MAGIC``), its storage type (int32, 0: dense), its shape (an int32 count of
dimensions, then each as an int64), its device (two int32) and its dtype (an int32 of mshadow's
type flags), then its data.

:func:`dense_arrays` reads a file of such arrays, each named, as numpy views of its bytes: what
the checkpoint writer needs (their shapes, and are they finite) with neither a copy nor MXNet,
which a process that only writes checkpoints would otherwise import (seconds). Whatever else a
buffer holds (sparse arrays, arrays saved under NumPy shape semantics, dtypes MXNet 1.9.1
cannot load, a list without names, malformed bytes) gives None, and is left to
``mx.nd.load_frombuffer``, which reads it or says why not.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["LIST_MAGIC", "dense_arrays"]

LIST_MAGIC = 0x112  # MXNet's kMXAPINDArrayListMagic: an NDArray file's first 8 bytes
_ARRAY_MAGIC = 0xF993FAC9  # NDARRAY_V2_MAGIC (V3, NumPy shapes, loads only under np_shape)
_DENSE = 0  # kDefaultStorage
_DTYPES = {  # the mshadow type flags MXNet 1.9.1 loads (not 8-11; bfloat16's 12 is not numpy's)
    0: "<f4",
    1: "<f8",
    2: "<f2",
    3: "u1",
    4: "<i4",
    5: "i1",
    6: "<i8",
    7: "?",
}


class _Unread(Exception):
    """The buffer holds something :func:`dense_arrays` leaves to MXNet."""


def dense_arrays(buffer) -> dict[str, np.ndarray] | None:
    """The arrays of ``buffer`` (``mx.nd.save``'s bytes of a dict of arrays, in ``bytes`` or a
    numpy ``uint8`` array) by name, as numpy views of it (nothing is copied): what
    ``mx.nd.load_frombuffer`` gives, as numpy arrays (except that a file of no arrays gives
    ``{}``, not MXNet's ``[]``). None for anything but dense arrays of MXNet's dtypes, each
    named, saved outside NumPy shape semantics, in a well-formed buffer."""
    data = memoryview(buffer).cast("B")
    try:
        at, (magic, _, count) = _ints(data, 0, "<u8", 3)
        if magic != LIST_MAGIC:
            raise _Unread
        arrays = []
        for _ in range(count):
            at, array = _array(data, at)
            arrays.append(array)
        at, (named,) = _ints(data, at, "<u8", 1)
        if named != count:
            raise _Unread
        names = []
        for _ in range(count):
            at, (length,) = _ints(data, at, "<u8", 1)
            name = bytes(data[at : at + length])
            if len(name) != length or b"\0" in name:  # MXNet's C strings end at a NUL
                raise _Unread
            names.append(name.decode())
            at += length
        if at != len(data):
            raise _Unread
    except (_Unread, ValueError):  # ValueError: a name not UTF-8, a shape numpy cannot make
        return None
    return dict(zip(names, arrays, strict=True))


def _array(data: memoryview, at: int) -> tuple[int, np.ndarray]:
    """The dense array whose ``NDArray::Save`` starts at ``at``, and where the next starts."""
    at, (magic, storage, ndim) = _ints(data, at, "<u4", 3)
    if magic != _ARRAY_MAGIC or storage != _DENSE or not 0 < ndim <= 32:
        raise _Unread  # sparse, or 0 dimensions: a shape unknown (no device, dtype, data follow)
    at, shape = _ints(data, at, "<i8", ndim)
    at, (_, _, flag) = _ints(data, at, "<i4", 3)  # device type and id, dtype
    if flag not in _DTYPES or min(shape) < 0:
        raise _Unread
    at, values = _read(data, at, _DTYPES[flag], math.prod(shape))
    return at, values.reshape(shape)


def _read(data: memoryview, at: int, dtype, count: int) -> tuple[int, np.ndarray]:
    """``count`` values of ``dtype`` from ``at`` (a view), and where the bytes after start."""
    dtype = np.dtype(dtype)
    end = at + dtype.itemsize * count
    if end > len(data):
        raise _Unread
    return end, np.frombuffer(data, dtype, count, at)


def _ints(data: memoryview, at: int, dtype, count: int) -> tuple[int, list[int]]:
    """:func:`_read` as Python ints (a header's fields)."""
    at, values = _read(data, at, dtype, count)
    return at, values.tolist()
