"""The controller side: one actor per module family that owns the run on its workers.

- :mod:`.actor`: the controller actor: the client's calls, its calls to the workers and the
  steps in flight;
- :mod:`.changes`: its changes of membership: leaving, growing, re-forming, recovering;
- :mod:`.states`: the states it moves through;
- :mod:`.failures`: what it signals when the membership breaks (recovered from here, or by
  ``fit`` from storage);
- :mod:`.loops`: the client's step loops under way, and what it keeps for each;
- :mod:`.plans`: a plan's stop flag, and the references it makes for the client;
- :mod:`.streams`: the members' shares of the Ray Datasets they stream;
- :mod:`.policy`: the elastic decisions, as pure functions;
- :mod:`.group`: placing the workers, their slots, the collective group's generations and
  the members on nodes Ray drains;
- :mod:`.membership`: who is in the group at a generation (what the client sees of it too),
  who was lost and the record of a change;
- :mod:`.chunks`: the steps it sends, and where their rows are after a re-forming (copied
  from those lost members read);
- :mod:`.replicas`: its journal of each module's replicas, replayed on workers that join;
- :mod:`.waits`: how long it waits for workers, and what a call's outcome says.
"""

from .actor import Controller, RemoteController
from .failures import EveryWorkerLost, StepsFailed
from .states import State

__all__ = ["Controller", "EveryWorkerLost", "RemoteController", "State", "StepsFailed"]
