"""The controller's journal of each module's replicas: what they were set up with.

A worker that joins the group (a replacement) is set up from it as the others were, and the
members' share of every module's global batch is split anew from it; the client's modules
are not asked.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Replica"]


@dataclass
class Replica:
    """One module's replicas, as set up by the calls the client made."""

    #: ModuleWorker.create's arguments after the id, but for the per-slot ones
    create: tuple
    #: the per-slot ones: (group2ctxs, device_id) of each slot
    per_slot: list
    #: ModuleWorker.bind's arguments but for the shapes:
    #: (for_training, inputs_need_grad, shared module id, grad_req)
    bind: tuple | None = None
    #: the global (data_shapes, label_shapes) bound or reshaped to, sealed (:mod:`raymodule.sealed`)
    shapes: object = None
    #: the global batch's size in those shapes
    batch_size: int = 0
    #: work_load_list, by slot
    work_load: list | None = None
    #: the call that installs the optimizer, as (method, args...)
    optimizer: tuple | None = None
    #: the parameters were set
    params: bool = False

    @property
    def holds_state(self) -> bool:
        """Whether these replicas own parameters and optimizer state (a module bound with
        ``shared_module`` uses another's)."""
        return self.bind is not None and self.params and self.bind[2] is None

    def split(self, slots: list[int]) -> list:
        """What each member, of those holding ``slots``, binds or reshapes to: the global
        shapes, the members' weights and its place among them (the worker splits the shapes,
        in MXNet's terms: :func:`raymodule.data.split_shapes`)."""
        weights = [self.work_load[s] for s in slots]
        return [(self.shapes, weights, index) for index in range(len(slots))]
