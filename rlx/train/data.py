"""Prompt streams for the RL loop, built on grain with checkpointable iterator state."""

from __future__ import annotations

from typing import Any, Sequence

import grain


class ProblemStream:
    """An endless, seeded, shuffled stream over a finite list of problems.

    Each epoch is a fresh permutation (grain's ``shuffle`` re-seeds per epoch over a
    ``repeat``ed dataset). ``shard_index``/``shard_count`` take every
    ``shard_count``-th element, for per-process sharding. ``get_state()`` is a small
    JSON-able dict saved in checkpoints; ``set_state`` resumes exactly there.
    """

    def __init__(self, problems: Sequence[Any], *, seed: int = 0, shard_index: int = 0,
                 shard_count: int = 1):
        if not len(problems):
            raise ValueError("ProblemStream: the problem list is empty")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"ProblemStream: shard_index={shard_index} not in "
                             f"[0, shard_count={shard_count})")
        self.problems = list(problems)
        ds = grain.MapDataset.source(self.problems).seed(seed).shuffle().repeat(None)
        if shard_count > 1:
            ds = ds[shard_index::shard_count]
        self._iter = iter(ds.to_iter_dataset())

    def next_batch(self, n: int) -> list[Any]:
        return [next(self._iter) for _ in range(n)]

    def get_state(self) -> dict:
        return dict(self._iter.get_state())

    def set_state(self, state: dict) -> None:
        if state:
            self._iter.set_state(state)
