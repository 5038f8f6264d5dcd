"""The controller's journal of each module's replicas: what they were set up with.

A worker that joins the group (a replacement) is set up from it as the others were, and the
members' share of every module's global batch is split anew from it; the client's modules
are not asked.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Replica", "record_call", "set_up"]


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

    def per_rank(self, slots: tuple[int, ...]) -> dict[int, tuple]:
        """The per-slot arguments of ``create`` of each member, by rank (``slots``: the
        members' slots, in rank order)."""
        return {rank: self.per_slot[slot] for rank, slot in enumerate(slots)}

    def split(self, slots: list[int]) -> list:
        """What each member, of those holding ``slots``, binds or reshapes to: the global
        shapes, the members' weights and its place among them (the worker splits the shapes,
        in MXNet's terms: :func:`raymodule.data.split_shapes`)."""
        weights = [self.work_load[s] for s in slots]
        return [(self.shapes, weights, index) for index in range(len(slots))]


def record_call(replicas: dict[int, Replica], method: str, args: tuple) -> None:
    """Notes in the journal (``replicas``, by module id) a call the client posted to every
    member: ``method(*args)``."""
    if method == "drop":
        replicas.pop(args[0], None)
    elif method == "set_params":
        replicas[args[0]].params = True
    elif method == "init_optimizer":
        replicas[args[0]].optimizer = ("init_optimizer", args[1], {}, False)
    elif method == "borrow_optimizer":
        replicas[args[0]].optimizer = ("borrow_optimizer", args[1])


def set_up(
    replicas: dict[int, Replica], slots: tuple[int, ...], *, old: list[int], new: list[int],
    behind: list[int], source: int, committed: int, post, submit,
) -> None:  # fmt: skip
    """Posts the calls that bring every member (``slots``: theirs, in rank order) of a group
    just formed into step, from the journal: each module created and bound on the ``new``
    ranks and reshaped on the ``old`` ones (its batch split anew); the state of member
    ``source``, taken once it applied step ``committed``, restored on those ``behind`` it (the
    new ones among them); the optimizer installed on the new ones, then their optimizer states
    restored from that state. ``post(method, *args, per_worker=, ranks=)`` and ``submit``
    (which returns the calls' references) are the controller's calls to the workers."""
    ordered = sorted(replicas.items())
    for mid, replica in ordered:
        if new:
            create = {rank: args for rank, args in replica.per_rank(slots).items() if rank in new}
            post("create", mid, *replica.create, per_worker=create, ranks=new)
        if replica.bind is None:
            continue
        per_worker = replica.split(slots)
        if old:
            post("reshape", mid, per_worker=per_worker, ranks=old)
        if new:
            post("bind", mid, *replica.bind, per_worker=per_worker, ranks=new)
    snapshots = {
        mid: submit("snapshot", mid, committed, ranks=[source])[0]
        for mid, replica in ordered
        if behind and replica.holds_state
    }
    for mid, snapshot in snapshots.items():  # parameters, and survivors' optimizer states
        post("restore", mid, snapshot, ranks=behind)
    for mid, replica in ordered:
        if new and replica.bind is not None and replica.optimizer is not None:
            post(replica.optimizer[0], mid, *replica.optimizer[1:], ranks=new)
    for mid, snapshot in snapshots.items():  # the new workers' optimizer states
        post("restore", mid, snapshot, ranks=new)
