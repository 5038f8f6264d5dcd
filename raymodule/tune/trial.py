"""The trial this process runs: what it reserved, its run, where it was restored from and its
report callbacks (set by :func:`raymodule.tune.with_workers`'s trainable, read by the rest)."""

from __future__ import annotations

from dataclasses import dataclass

from ..run import RunConfig


@dataclass(frozen=True)
class TrialResources:
    """What one trial reserves: its own process and ``num_workers`` workers."""

    num_workers: int
    cpus: float
    gpus: float
    head_cpus: float

    @property
    def worker_bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0}

    def bundles(self) -> list[dict[str, float]]:
        """The head bundle (empty when ``head_cpus`` is 0), then one bundle per worker."""
        head = {"CPU": self.head_cpus} if self.head_cpus > 0 else {}
        return [head] + [dict(self.worker_bundle) for _ in range(self.num_workers)]

    def describe(self) -> str:
        head = f"{self.head_cpus:g} CPU for the trial process + " if self.head_cpus else ""
        return f"{head}{self.num_workers} workers x {fmt(self.worker_bundle)}"

    def total(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for bundle in self.bundles():
            for key, value in bundle.items():
                total[key] = total.get(key, 0) + value
        return total


class Trial:
    """The trial this process runs (set by the trainable of :func:`with_workers`)."""

    resources: TrialResources | None = None
    run: RunConfig | None = None
    restored_from: dict | None = None  # the Tune checkpoint the trial continues from
    reporters: list = []  # this trial's report callbacks, flushed when train_fn returns
    adopted: set = set()  # (trial id, Tune checkpoint path) already committed into the run

    @classmethod
    def start(cls, resources: TrialResources) -> None:
        cls.resources, cls.run, cls.restored_from, cls.reporters = resources, None, None, []


def fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
