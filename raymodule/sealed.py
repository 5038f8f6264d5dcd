"""Arguments the controller passes on to the workers without opening them.

The controller relays the client's calls to the workers and keeps a journal of them for
replacements, but reads few of their arguments. The others (a symbol, a metric, an optimizer,
shapes, parameters) are MXNet objects, and unpickling one imports MXNet: seconds of CPU in a
process that never computes with them, spent while the workers start on the same cores. The
client seals such an argument (:func:`seal`): pickled on its side, as Ray sends it. The controller's
process unpickles it as a :class:`Sealed` (:func:`keep_sealed`), relays it and journals it as
such; every other process (a worker, the client reading a reply) unpickles the object itself,
so a worker's methods receive what the client passed.
"""

from __future__ import annotations

import pickle

import numpy as np
import ray
from ray import cloudpickle

__all__ = ["Sealed", "seal", "seal_objects", "keep_sealed"]

_keep = False  # True in the controller's process: sealed objects stay sealed there
_PLAIN = (bool, int, float, complex, str, bytes, slice, np.ndarray, np.generic, np.dtype)


class Sealed:
    """An object pickled by the process that sealed it, opened by the process that needs it.

    The client's object is pickled when Ray serializes the call that carries it, inside
    Ray's own serialization: Ray then counts the object references in it as the call's, as
    for any argument. The controller's copy is those bytes, relayed as they are."""

    __slots__ = ("_value", "_blob")

    def __init__(self, value=None, blob: bytes | None = None):
        self._value, self._blob = value, blob

    def __reduce__(self):
        blob = self._blob if self._blob is not None else cloudpickle.dumps(self._value)
        return _open, (blob,)

    def __repr__(self) -> str:
        return "Sealed(...)" if self._blob is None else f"Sealed({len(self._blob)} bytes)"


def _open(blob: bytes):
    return Sealed(blob=blob) if _keep else pickle.loads(blob)


def keep_sealed() -> None:
    """Makes this process (the controller's) unpickle sealed objects as :class:`Sealed`."""
    global _keep
    _keep = True


def seal(value) -> Sealed:
    return Sealed(value)


def seal_objects(value):
    """``value`` with every object in it sealed but plain data: None, numbers, strings, bytes,
    slices, numpy arrays and types, Ray object references (which must travel as themselves),
    and lists, tuples and dicts of these, which are rebuilt around what they hold."""
    if value is None or isinstance(value, (*_PLAIN, ray.ObjectRef, Sealed)):
        return value
    if type(value) in (list, tuple):
        return type(value)(seal_objects(item) for item in value)
    if type(value) is dict:
        return {key: seal_objects(item) for key, item in value.items()}
    if isinstance(value, type) and value.__module__ in ("builtins", "numpy"):
        return value  # a dtype given as a type: np.float32, float
    return seal(value)
