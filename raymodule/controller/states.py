"""The controller's states, each change logged once (``Controller._enter``)::

    STARTING -> RUNNING <-> RECOVERING -> WAITING_FOR_WORKERS -> RECOVERING -> RUNNING
                RUNNING <-> GROWING
                RUNNING  -> LEAVING -> RECOVERING (members shut down gracefully: SIGTERM, drain)
    any -> FAILED (the run cannot go on: every later call says why) ; any -> CLOSED

RECOVERING, WAITING_FOR_WORKERS, GROWING and LEAVING, and RUNNING again after them, are
entered by its changes of membership (:mod:`.changes`).
"""

from __future__ import annotations

import enum

__all__ = ["State"]


class State(enum.Enum):
    STARTING = "placing the workers and forming their group"
    RUNNING = "the group is whole or within its limits"
    RECOVERING = "removing lost workers and re-forming the group"
    WAITING_FOR_WORKERS = "below the floor: waiting for replacements"
    GROWING = "admitting replacements"
    LEAVING = "removing members shut down (SIGTERM) or drained, at a step boundary"
    FAILED = "the run cannot go on on these workers"
    CLOSED = "the workers are stopped"
