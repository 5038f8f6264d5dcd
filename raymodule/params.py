"""MXNet's rules for taking parameters from the caller's dicts, applied on the client.

``init_params`` fills the module's host copies (``Module.init_params``); ``set_params`` with
``allow_missing=True`` hands the caller's dicts to the executors (``Executor.copy_params_from``).
Both raise what MXNet raises, at the name where MXNet raises it, having copied what MXNet
copied before it.
"""

from __future__ import annotations

from mxnet.base import MXNetError
from mxnet.initializer import InitDesc

__all__ = ["initialize", "copyable"]


def _shape_error(name: str, given, held) -> MXNetError:
    # MXNet's copyto raises MXNetError ("Incompatible attr ...") for this; the type is kept
    return MXNetError(
        f"{name}: given shape {tuple(given.shape)}, the module needs {tuple(held.shape)}"
    )


def initialize(symbol, held, given, initializer, allow_missing: bool) -> None:
    """Fills the host arrays ``held`` (name -> NDArray, arguments or auxiliary states) from
    ``given`` (the caller's dict or None) and ``initializer``, in sorted order, as MXNet's
    ``Module.init_params`` does: a name missing from ``given`` is a ``RuntimeError`` unless
    ``allow_missing``."""
    attrs = symbol.attr_dict()
    for name, arr in sorted(held.items()):
        desc = InitDesc(name, attrs.get(name, None))
        if given is None:
            initializer(desc, arr)
        elif name in given:
            if given[name] is not arr:
                if tuple(given[name].shape) != tuple(arr.shape):
                    raise _shape_error(name, given[name], arr)
                given[name].copyto(arr)
        else:
            if not allow_missing:
                raise RuntimeError("%s is not presented" % desc)
            if initializer is not None:
                initializer(desc, arr)


def copyable(held_arg, held_aux, arg_params, aux_params, arguments, allow_extra: bool):
    """What ``Executor.copy_params_from`` copies of ``arg_params`` and ``aux_params``, and the
    error it stops at: ``((arg, aux), error or None)``.

    Names are taken in the caller's order, arguments first; a name the symbol lacks (not in
    ``arguments`` or ``held_aux``) is MXNet's ``ValueError`` unless ``allow_extra``, a shape
    other than the held array's an ``MXNetError``. Inputs (data, labels) among the arguments
    are left out: the next forward overwrites them anyway.
    """
    copied: tuple[dict, dict] = ({}, {})
    for kind, (given, held, names, message) in enumerate(
        (
            (arg_params, held_arg, arguments, 'Find name "%s" that is not in the arguments'),
            (aux_params, held_aux, held_aux, "Find name %s that is not in the auxiliary states"),
        )
    ):
        for name, value in (given or {}).items():
            if name not in names:
                if not allow_extra:
                    return copied, ValueError(message % name)
            elif name in held:
                if tuple(value.shape) != tuple(held[name].shape):
                    return copied, _shape_error(name, value, held[name])
                copied[kind][name] = value
    return copied, None
