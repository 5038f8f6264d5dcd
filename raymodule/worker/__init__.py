"""The worker side: one actor per context holding native MXNet replicas (:mod:`.actor`),
and the gradient collective among the workers (:mod:`.collective`)."""

from .actor import ModuleWorker

__all__ = ["ModuleWorker"]
