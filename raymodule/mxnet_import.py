"""Importing MXNet in raymodule's workers without scikit-learn.

MXNet 1.9's ``mxnet.model`` imports scikit-learn, when it is installed, only to make the
deprecated ``FeedForward`` an sklearn estimator. With what scikit-learn pulls in, that is half
a second of CPU in every process that imports MXNet, and these processes never use
``FeedForward``. scikit-learn is hidden while MXNet loads, and only then: code that runs in
these processes afterwards (a user's metric, an initializer) imports it as usual. The user's
own process imports MXNet as it always does.
"""

from __future__ import annotations

import sys

__all__ = ["import_mxnet"]


def import_mxnet() -> None:
    """Imports MXNet, scikit-learn hidden meanwhile."""
    hide = "sklearn" not in sys.modules
    if hide:
        sys.modules["sklearn"] = None  # `import sklearn` raises ImportError, which MXNet allows
    try:
        import mxnet  # noqa: F401
    finally:
        if hide and sys.modules.get("sklearn", 0) is None:
            del sys.modules["sklearn"]
