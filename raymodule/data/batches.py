"""How a global batch becomes per-worker slices, and per-worker outputs become one again,
in MXNet's terms: shapes as ``DataDesc``, arrays as NDArrays.

The split is :func:`raymodule.data.parts.split_slices` (MXNet's rule) along each input's batch
axis (from its layout), so N workers see exactly what N devices of one MXNet process would.
"""

from __future__ import annotations

import struct

import mxnet as mx
import numpy as np
from mxnet.io import DataDesc

from ..ndfile import LIST_MAGIC
from .parts import Batch, split_slices

__all__ = [
    "batch_size_of",
    "split_shapes",
    "batch_axes",
    "to_batch",
    "to_numpy",
    "to_ndarray",
    "ndarray_view",
    "copy_into",
    "nd_bytes",
    "nd_buffer",
    "split_params",
    "merge_outputs",
]


def with_batch(desc: DataDesc, size: int) -> DataDesc:
    """``desc`` with ``size`` samples on its batch axis."""
    axis = DataDesc.get_batch_axis(desc.layout)
    shape = list(desc.shape)
    shape[axis] = size
    return DataDesc(desc.name, tuple(shape), desc.dtype, desc.layout)


def batch_size_of(data_shapes) -> int:
    """The global batch's size in ``data_shapes`` (``DataDesc``s)."""
    sizes = {d.shape[DataDesc.get_batch_axis(d.layout)] for d in data_shapes}
    if len(sizes) != 1:
        raise ValueError(f"data_shapes={data_shapes}: every input needs the same batch size")
    return sizes.pop()


def split_shapes(data_shapes, label_shapes, work_load_list: list[float]):
    """The work split of a global batch of these shapes: each worker's slice of it, and each
    worker's ``(data_shapes, label_shapes)``."""
    slices = split_slices(batch_size_of(data_shapes), work_load_list)
    per_worker = []
    for part in slices:
        n = part.stop - part.start
        per_worker.append(
            (
                [with_batch(d, n) for d in data_shapes],
                [with_batch(d, n) for d in label_shapes] if label_shapes else None,
            )
        )
    return slices, per_worker


def batch_axes(descs: list[DataDesc] | None) -> list[int]:
    return [DataDesc.get_batch_axis(d.layout) for d in descs or []]


def to_numpy(array) -> np.ndarray:
    return array.asnumpy() if isinstance(array, mx.nd.NDArray) else np.asarray(array)


def to_ndarray(array: np.ndarray, context: mx.Context | None = None) -> mx.nd.NDArray:
    """An NDArray copy of ``array`` in its own dtype (``mx.nd.array`` would make it float32),
    on ``context`` (the current one if None)."""
    return mx.nd.array(array, ctx=context, dtype=array.dtype)


_VIEWABLE = frozenset(
    np.dtype(t) for t in ("float16", "float32", "float64", "uint8", "int32", "int64")
)


def ndarray_view(array: np.ndarray) -> mx.nd.NDArray:
    """A CPU NDArray over ``array``'s own memory (DLPack), for an array nothing writes again:
    ``array`` is made read-only, and kept alive until MXNet is done with it. Unlike
    :func:`to_ndarray`, it neither copies nor waits: ``mx.nd.array``'s synchronous copy waits
    for the operations MXNet's engine has queued (the step before), which keeps a worker from
    queueing its next step while the last one runs. An array it cannot view (not C-contiguous,
    empty, or of another dtype) is copied."""
    if array.dtype in _VIEWABLE and array.ndim and array.size and array.flags.c_contiguous:
        return mx.nd.from_numpy(array, zero_copy=True)
    return to_ndarray(array)


def copy_into(target: mx.nd.NDArray, array: np.ndarray) -> None:
    """Copies ``array`` (which nothing writes again) into ``target`` through MXNet's engine,
    without waiting for the copy (``target[:] = array`` waits for the engine's queue)."""
    if array.dtype == target.dtype and array.shape == target.shape:
        ndarray_view(array).copyto(target)
    else:
        target[:] = array


def nd_bytes(arrays) -> bytes:
    """``arrays`` (what ``mx.nd.save`` takes: a dict of NDArrays by name, a list, or one
    NDArray) in MXNet's NDArray file format, in memory: the bytes ``mx.nd.save`` writes
    (``mx.nd.load_frombuffer`` reads them), made without a file, so that a process killed
    meanwhile leaves nothing behind. See :func:`nd_buffer`."""
    return nd_buffer(arrays).tobytes()


def nd_buffer(arrays) -> np.ndarray:
    """:func:`nd_bytes`'s bytes in a numpy ``uint8`` array, which Ray hands to another process
    without copying it (a worker's snapshot). The layout is MXNet 1.9.1's ``NDArray::Save``
    of a list: the magic number and a reserved word, the arrays (each as MXNet pickles an
    NDArray, ``MXNDArraySaveRawBytes``: a header, then the data) and the names, each count
    and length a little-endian uint64. A dense CPU array's data is copied once, by MXNet's
    engine, straight into the buffer, after the header MXNet made for the first array of its
    shape, dtype and device (a copy less than MXNet's pickling, which copies twice, and a
    third time into a joined ``bytes``); any other array is pickled by MXNet."""
    if isinstance(arrays, mx.nd.NDArray):
        arrays = [arrays]
    names, values = (
        (list(arrays), list(arrays.values())) if isinstance(arrays, dict) else ([], arrays)
    )
    if (
        not isinstance(arrays, dict | list)
        or not all(isinstance(name, str) for name in names)
        or not all(isinstance(value, mx.nd.NDArray) for value in values)
    ):
        raise TypeError(
            "expected what mx.nd.save takes: a dict of str -> NDArray, a list of NDArrays or "
            f"an NDArray, not {type(arrays).__name__}"
        )
    head = struct.pack("<QQQ", LIST_MAGIC, 0, len(values))
    tail = [struct.pack("<Q", len(names))]
    for name in names:
        encoded = name.encode()
        tail.append(struct.pack("<Q", len(encoded)) + encoded)
    pieces = [_saved_piece(value) for value in values]  # (bytes, array whose data follows)
    size = len(head) + sum(len(b) + _data_bytes(a) for b, a in pieces) + sum(map(len, tail))
    out = np.empty(size, np.uint8)
    at, copies = 0, []
    for chunk, array in [(head, None), *pieces, *[(t, None) for t in tail]]:
        out[at : at + len(chunk)] = np.frombuffer(chunk, np.uint8)
        at += len(chunk)
        if array is not None:
            nbytes = _data_bytes(array)
            view = out[at : at + nbytes].view(array.dtype).reshape(array.shape)
            copies.append(mx.nd.from_numpy(view, zero_copy=True))
            array.copyto(copies[-1])
            at += nbytes
    for copy in copies:
        copy.wait_to_read()
    return out


_SAVED_HEADERS: dict[tuple, bytes] = {}  # MXNet's header of a dense CPU array, by its layout
_SAVED_HEADERS_KEPT = 4096


def _saved_piece(array: mx.nd.NDArray) -> tuple[bytes, mx.nd.NDArray | None]:
    """What MXNet's ``NDArray::Save`` writes for ``array``: its header and the array, whose
    data follows the header (a dense CPU array of a dtype DLPack carries), or else all of it
    and None."""
    if (
        type(array) is not mx.nd.NDArray  # sparse, or mx.np's (which MXNet refuses to save)
        or array.context.device_type != "cpu"
        or array.size == 0
        or np.dtype(array.dtype) not in _VIEWABLE
    ):
        return bytes(array.__getstate__()["handle"]), None
    key = (array.shape, np.dtype(array.dtype), array.context.device_id, mx.util.is_np_shape())
    header = _SAVED_HEADERS.get(key)
    if header is None:
        saved = bytes(array.__getstate__()["handle"])
        if len(_SAVED_HEADERS) >= _SAVED_HEADERS_KEPT:
            _SAVED_HEADERS.clear()
        header = _SAVED_HEADERS[key] = saved[: len(saved) - _data_bytes(array)]
    return header, array


def _data_bytes(array: mx.nd.NDArray | None) -> int:
    return 0 if array is None else array.size * np.dtype(array.dtype).itemsize


def to_batch(data_batch, data_descs, label_descs) -> Batch:
    """The arrays of an ``mx.io.DataBatch`` as a :class:`Batch` (labels kept only when bound)."""
    labels = data_batch.label if label_descs else None
    return Batch(
        data=[to_numpy(a) for a in data_batch.data],
        label=[to_numpy(a) for a in labels or []],
        data_axes=batch_axes(data_descs),
        label_axes=batch_axes(label_descs) if labels else [],
    )


def merge_outputs(
    per_worker: list[list[np.ndarray]], axes: list[int], contexts: list[mx.Context]
) -> list[mx.nd.NDArray]:
    """Per-worker outputs joined along their batch axes, like MXNet's ``_merge_multi_context``,
    each on its entry of ``contexts`` (the first worker's array's, in MXNet)."""
    merged = []
    for index, axis in enumerate(axes):
        parts = [outputs[index] for outputs in per_worker]
        joined = np.concatenate(parts, axis=axis) if axis >= 0 and len(parts) > 1 else parts[0]
        merged.append(to_ndarray(joined, contexts[index]))
    return merged


def split_params(save_dict: dict) -> tuple[dict, dict]:
    """``arg:``/``aux:`` entries of an MXNet ``.params`` file, as ``mx.model.load_params``."""
    arg_params, aux_params = {}, {}
    for key, value in save_dict.items():
        kind, name = key.split(":", 1)
        if kind == "arg":
            arg_params[name] = value
        elif kind == "aux":
            aux_params[name] = value
    return arg_params, aux_params
