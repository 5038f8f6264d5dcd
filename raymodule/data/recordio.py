"""MXNet indexed RecordIO as a dataset the workers read themselves.

A ``.rec`` file holds records one after another, each framed as dmlc-core's RecordIO frames
it (a magic number, a length word, the payload padded to 4 bytes; a payload that holds the
magic number is split over several frames); its ``.idx`` is a text file of ``key\\toffset``
lines, one per record, in file order. ``im2rec`` and ``mx.recordio.MXIndexedRecordIO`` write
both. A record's payload is an ``MXImageRecord``: an ``IRHeader`` (label(s), id) then the
encoded image (``mx.recordio.pack``/``pack_img``).

A :class:`RecordIODataset` reads the ``.idx`` once, in the client, when it is made, and checks
it against the ``.rec``; it then reads each record by its byte range (from its offset to the
next record's, or to the end of the file), from a local path or any URI the run storage takes
(``s3://bucket/train.rec?endpoint_override=...``), with one ranged read per record. It
pickles as its locations, index and shapes, never as record bytes (once raymodule's ``fit``
or ``score`` has used it: as a reference to its index in Ray's object store); a copy opens
the ``.rec`` the first time it reads.
"""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Callable

import mxnet as mx
import numpy as np

from ..storage import open_for_reads, read_bytes, redact
from .datasets import Dataset, from_store

__all__ = ["RecordIODataset"]

MAGIC = 0xCED7230A  # dmlc-core's RecordIO magic number, little-endian on disk
_FRAME = struct.Struct("<II")  # magic, then flag (upper 3 bits) and length (lower 29)
_LENGTH_MASK = (1 << 29) - 1
# an .idx is read whole into the client: this bounds it (about 40 M records)
IDX_LIMIT = 1024**3


def read_record(buffer: bytes) -> bytes:
    """The payload of the record framed at the start of ``buffer`` (what
    ``mx.recordio.MXRecordIO.read()`` gives for it), its frames joined; ValueError says how
    ``buffer`` is not a record (a wrong magic number, a frame cut short)."""
    parts, position = [], 0
    while True:
        if position + _FRAME.size > len(buffer):
            raise ValueError(f"its frame at byte {position} is cut short (the file ends)")
        magic, word = _FRAME.unpack_from(buffer, position)
        if magic != MAGIC:
            raise ValueError(
                f"the magic number at byte {position} is {magic:#010x}, not {MAGIC:#010x}: "
                "not the start of a record"
            )
        flag, length = word >> 29, word & _LENGTH_MASK
        start = position + _FRAME.size
        if start + length > len(buffer):
            raise ValueError(f"its frame at byte {position} holds {length} bytes past the end")
        parts.append(buffer[start : start + length])
        position = start + (length + 3) // 4 * 4
        if flag in (0, 3):  # a whole record, or its last frame
            break
    return struct.pack("<I", MAGIC).join(parts)


class RecordIODataset(Dataset):
    """The records of an MXNet indexed RecordIO file pair (``.rec`` and ``.idx``, as
    ``im2rec`` or ``mx.recordio.MXIndexedRecordIO`` write them) as samples, in the ``.idx``'s
    order: sample ``i`` is the record of its ``i``-th line.

    ``rec`` and ``idx`` are local paths or URIs (the same rules as a run's ``storage``;
    credentials in a URI are never printed). ``data_shape`` is each sample's ``(channels,
    height, width)``; ``label_width`` the labels per record (a label of shape ``()`` for 1, as
    ``mx.io.ImageRecordIter`` gives, else ``(label_width,)``). Samples are float32.

    By default a record is an image record (``mx.recordio.pack_img``): its image is decoded
    by MXNet (``mx.image.imdecode``: 1 channel as grayscale, 3 as RGB), resized so it covers
    ``height x width`` and center-cropped to it, as CHW float32 of its pixel values (0-255),
    its label(s) from its header. ``decode(record) -> (data, label)`` replaces that: it is
    given a record's payload (what ``MXRecordIO.read()`` returns) and must give arrays of the
    sample's shapes; it travels to the workers, so it must pickle (a module-level function).

    The ``.idx`` is read here, and checked against the ``.rec``: offsets in increasing order
    inside the file, the first and last records framed as records and decoded to
    ``data_shape``. A record that does not decode later, on a worker, fails the step with an
    error naming it and the file.
    """

    def __init__(
        self,
        rec: str,
        idx: str,
        data_shape: tuple[int, int, int],
        label_width: int = 1,
        decode: Callable[[bytes], tuple] | None = None,
    ):
        self.rec, self.idx = str(rec), str(idx)
        self.data_shape = _shape(data_shape)
        if isinstance(label_width, bool) or not isinstance(label_width, (int, np.integer)):
            raise ValueError(f"RecordIODataset: label_width={label_width!r} must be an int >= 1")
        if label_width < 1:
            raise ValueError(f"RecordIODataset: label_width={label_width} must be >= 1")
        self.label_width = int(label_width)
        if decode is not None and not callable(decode):
            raise ValueError(f"RecordIODataset: decode={decode!r} is not callable")
        if decode is None and self.data_shape[0] not in (1, 3):
            raise ValueError(
                f"RecordIODataset: data_shape={self.data_shape} has {self.data_shape[0]} "
                "channels; the default decode makes 1 (grayscale) or 3 (RGB): pass a decode "
                "for others"
            )
        self.decode = decode
        self._keys, self._offsets = _read_index(self.idx)
        self._length = len(self._offsets)
        self._index_ref = None  # the index in Ray's object store, once key() put it there
        self._file = None
        self.rec_size = self._open().size()
        self._check_index()
        self.data_names = None
        self.label_names = None
        self.data_descs = [(self.data_shape, np.float32)]
        label_shape = () if self.label_width == 1 else (self.label_width,)
        self.label_descs = [(label_shape, np.float32)]
        self._key = uuid.uuid4().hex
        for i in sorted({0, len(self) - 1}):
            self.sample(i)  # decoded to data_shape, or a ValueError naming it

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return (
            f"RecordIODataset({len(self)} records of {redact(self.rec)!r}, "
            f"data {self.data_shape}, label width {self.label_width})"
        )

    def key(self) -> str:
        """A name made for this dataset when it was made, kept by its pickled copies. Its
        first call (raymodule's ``fit`` and ``score`` make it before their steps) also puts
        the index (keys and offsets) in Ray's object store: the copies pickled after it carry
        the reference, and read the index once, where they first read a record."""
        if self._index_ref is None and self._offsets is not None:
            import ray

            self._index_ref = ray.put((self._keys, self._offsets))
        return self._key

    def __getstate__(self) -> dict:
        state = dict(self.__dict__, _file=None)  # the copy opens the .rec when it first reads
        if self._index_ref is not None:
            state.update(_keys=None, _offsets=None)
        return state

    def _index(self) -> tuple[list[str], np.ndarray]:
        """The keys and offsets of the records, in the .idx's order."""
        if self._offsets is None:  # a copy pickled after key(): read the index once
            self._keys, self._offsets = from_store(
                self._index_ref, f"{self!r}: its index keys and offsets"
            )
        return self._keys, self._offsets

    def _open(self):
        if self._file is None:
            try:
                self._file = open_for_reads(self.rec)
            except (OSError, ValueError) as err:
                raise ValueError(f"RecordIODataset: rec: {err}") from None
        return self._file

    def _check_index(self) -> None:
        """Offsets that increase inside the rec, and records framed at the first and last."""
        where = f"RecordIODataset: idx {redact(self.idx)!r} does not match rec {redact(self.rec)!r}"
        keys, offsets = self._index()
        steps = np.diff(offsets)
        if (steps <= 0).any():
            line = int(np.argmax(steps <= 0)) + 1
            raise ValueError(
                f"{where}: record {line} (key {keys[line]!r}) is at byte "
                f"{offsets[line]}, not after the one before (at byte "
                f"{offsets[line - 1]}): offsets must increase"
            )
        if offsets[-1] >= self.rec_size:
            raise ValueError(
                f"{where}: record {len(self) - 1} (key {keys[-1]!r}) is at byte "
                f"{offsets[-1]}, past the end of the rec ({self.rec_size} bytes)"
            )
        for i in sorted({0, len(self) - 1}):
            try:
                self.record(i)
            except ValueError as err:
                raise ValueError(f"{where}: {str(err).removeprefix('RecordIODataset: ')}") from None

    def record(self, i: int) -> bytes:
        """The payload of record ``i`` (``i``-th line of the ``.idx``), read by its byte range."""
        offsets = self._index()[1]
        start = int(offsets[i])
        stop = int(offsets[i + 1]) if i + 1 < len(self) else self.rec_size
        buffer = self._open().read_at(stop - start, start)
        try:
            return read_record(buffer)
        except ValueError as err:
            raise ValueError(f"{self._name(i)}: {err}") from None

    def _name(self, i: int) -> str:
        keys, offsets = self._index()
        return (
            f"RecordIODataset: record {i} (key {keys[i]!r}, at byte {offsets[i]}) "
            f"of {redact(self.rec)!r}"
        )

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Record ``i`` decoded: its data (``data_shape``) and label, float32."""
        record = self.record(i)
        label_shape = self.label_descs[0][0]
        try:
            data, label = (self.decode or self._decode_image)(record)
            data = np.asarray(data, dtype=np.float32)
            label = np.asarray(label, dtype=np.float32)
        except Exception as err:  # whatever the decoder raises: say which record
            raise ValueError(
                f"{self._name(i)} does not decode: {type(err).__name__}: {err}"
            ) from None
        if data.shape != self.data_shape:
            raise ValueError(
                f"{self._name(i)} decodes to data of shape {data.shape}, not data_shape="
                f"{self.data_shape}"
            )
        if label.size != self.label_width:
            raise ValueError(
                f"{self._name(i)} has {label.size} labels, not label_width={self.label_width}"
            )
        return data, label.reshape(label_shape)

    def _decode_image(self, record: bytes) -> tuple[np.ndarray, np.ndarray]:
        header, image = mx.recordio.unpack(record)
        channels, height, width = self.data_shape
        pixels = mx.image.imdecode(image, flag=1 if channels == 3 else 0)  # HWC uint8
        h, w = pixels.shape[:2]
        if (h, w) != (height, width):  # cover height x width, then cut its center
            scale = max(height / h, width / w)
            size = (max(width, math.ceil(w * scale)), max(height, math.ceil(h * scale)))
            pixels = mx.image.imresize(pixels, *size)
            pixels, _ = mx.image.center_crop(pixels, (width, height))
        return pixels.asnumpy().transpose(2, 0, 1), header.label

    def take(self, indices: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The samples at ``indices`` (in that order), each record read by its byte range."""
        data = np.empty((len(indices),) + self.data_shape, np.float32)
        label = np.empty((len(indices),) + self.label_descs[0][0], np.float32)
        for row, i in enumerate(indices):
            data[row], label[row] = self.sample(int(i))
        return [data], [label]


def _shape(data_shape) -> tuple[int, int, int]:
    if (
        not isinstance(data_shape, (tuple, list))
        or len(data_shape) != 3
        or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in data_shape)
        or any(d < 1 for d in data_shape)
    ):
        raise ValueError(
            f"RecordIODataset: data_shape={data_shape!r} must be 3 positive ints: "
            "(channels, height, width)"
        )
    return tuple(int(d) for d in data_shape)


def _read_index(idx: str) -> tuple[list[str], np.ndarray]:
    """The keys and offsets of an ``.idx`` file, in its order."""
    try:
        text = read_bytes(idx, limit=IDX_LIMIT).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"RecordIODataset: idx {redact(idx)!r} is not a text file") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"RecordIODataset: idx: {err}") from None
    keys, offsets = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        try:
            if len(fields) != 2:
                raise ValueError
            offset = int(fields[1])
            if offset < 0:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"RecordIODataset: idx {redact(idx)!r} line {number} is {line[:80]!r}, not "
                "'key<TAB>offset' with an offset >= 0"
            ) from None
        keys.append(fields[0])
        offsets.append(offset)
    if not offsets:
        raise ValueError(f"RecordIODataset: idx {redact(idx)!r} lists no records")
    return keys, np.array(offsets, dtype=np.int64)
