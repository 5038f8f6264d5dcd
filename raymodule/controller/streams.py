"""The members' shares of the Ray Datasets they stream: ``Dataset.streaming_split`` among
them, made once per dataset and group generation."""

from __future__ import annotations

from dataclasses import dataclass

from .membership import Membership

__all__ = ["DatasetSplits"]

_KEPT = 2  # Ray Datasets whose split is kept (training's and validation's)


@dataclass
class _Stream:
    """A Ray Dataset the members stream, and their split of it (``key``: the dataset's and the
    generation's it was made for)."""

    dataset: object
    key: str | None = None
    shares: list | None = None


class DatasetSplits:
    """The splits of the latest Ray Datasets streamed, by the client's iterator key; an older
    one's is let go, and with it its coordinator actor."""

    def __init__(self):
        self._streams: dict[str, _Stream] = {}

    def shares(self, stream: dict, members: Membership) -> tuple[str, list]:
        """The members' shares of ``stream``'s dataset (each share's blocks preferably on its
        member's node): ``(the split's key, the shares in rank order)``. The first chunk of a
        pass brings the dataset (``stream["dataset"]``)."""
        known = self._streams.pop(stream["key"], None)
        if known is None:
            known = _Stream(stream["dataset"])
        self._streams[stream["key"]] = known  # the newest last
        while len(self._streams) > _KEPT:
            del self._streams[next(iter(self._streams))]
        key = f"{stream['key']}/{members.generation}"
        if known.key != key:  # none yet, or an earlier generation's (released)
            nodes = [node.get("node") for node in members.nodes]
            known.key, known.shares = (
                key,
                known.dataset.streaming_split(
                    members.world_size,
                    equal=True,
                    locality_hints=nodes if all(nodes) else None,
                ),
            )
        return known.key, known.shares
