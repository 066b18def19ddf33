"""Verifiable-task protocol: problems, deterministic seeded splits, demonstrations.

A task is a generator over a (finite or huge) *problem space*. Every problem has a
canonical key (its identity, independent of presentation order). The train / held-out
split is a **hash partition of the problem space**:

    bucket(p) = int(blake2b(f"{task.name}|{split_salt}|{task.key(p)}")[:8]) mod 10_000
    split(p)  = "heldout" if bucket(p) < heldout_fraction * 10_000 else "train"

so a problem belongs to exactly one split no matter which seed, order or process drew
it: the splits never overlap. Drawing ``n`` problems of one split is rejection sampling
from a ``random.Random`` seeded with ``f"{name}|{seed}|{split}"`` (string seeding hashes
with SHA-512, so it is stable across processes and Python versions); the same
``(task config, split, seed, n)`` always yields the same list.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import random
import re
from collections.abc import Iterator
from typing import Any

SPLITS = ("train", "heldout")
_BUCKETS = 10_000


@dataclasses.dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    Attributes:
      prompt: the text shown to the policy (before any templating).
      answer: the reference answer as text (what reward functions compare against).
      meta: task-specific data (numbers, target, reference solution, ...). It is not part
        of the hash, so problems stay hashable; treat it as read-only.
    """

    prompt: str
    answer: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)


class Task(abc.ABC):
    """Base class: subclasses define ``name``, ``sample``, ``key`` and ``demonstration``.

    Args:
      heldout_fraction: share of the problem space (by hash bucket) reserved for the
        held-out split, in (0, 1).
      split_salt: changes the partition without changing the task (for a fresh split).
    """

    name: str = "task"
    #: regular expression (``re.fullmatch`` on the stripped completion) of a well-formed
    #: completion; used by the format reward.
    format_pattern: str = r".*"

    def __init__(self, *, heldout_fraction: float = 0.1, split_salt: str = ""):
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
        self.heldout_fraction = float(heldout_fraction)
        self.split_salt = str(split_salt)

    # -- to implement -------------------------------------------------------------------
    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Problem:
        """Draws one problem from the whole problem space (either split)."""

    @abc.abstractmethod
    def key(self, problem: Problem) -> str:
        """Canonical identity of a problem (equal keys = the same problem)."""

    @abc.abstractmethod
    def demonstration(self, problem: Problem, rng: random.Random | None = None) -> str:
        """A completion in exactly the format the task's reward expects; without ``rng``
        a correct, deterministic one.

        ``rng`` lets a task vary its demonstrations per draw (e.g. the arithmetic task's
        worked solutions, or its sloppy teacher's deliberate slips)."""

    @abc.abstractmethod
    def reward_names(self) -> tuple[str, ...]:
        """Names (in ``rlx.rewards`` registry) of the task's correctness rewards."""

    # -- provided -------------------------------------------------------------------------
    def split_of(self, problem: Problem) -> str:
        """``"train"`` or ``"heldout"`` by the hash partition described in the module doc."""
        text = f"{self.name}|{self.split_salt}|{self.key(problem)}".encode()
        bucket = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") % _BUCKETS
        return "heldout" if bucket < self.heldout_fraction * _BUCKETS else "train"

    def stream(self, split: str, *, seed: int = 0) -> Iterator[Problem]:
        """Infinite deterministic stream of problems of one split (repeats possible)."""
        _check_split(split)
        rng = random.Random(f"{self.name}|{seed}|{split}")
        misses = 0
        while True:
            problem = self.sample(rng)
            if self.split_of(problem) == split:
                misses = 0
                yield problem
            else:
                misses += 1
                if misses > 100_000:
                    raise ValueError(
                        f"task {self.name!r}: no problem of split {split!r} found in "
                        "100000 draws; the problem space is too small for heldout_fraction"
                        f"={self.heldout_fraction}"
                    )

    def generate(self, split: str, n: int, *, seed: int = 0, unique: bool = True) -> list[Problem]:
        """``n`` problems of ``split``, deterministic in ``seed``; distinct keys if ``unique``.

        Raises ValueError when ``unique`` and the split has fewer than ``n`` problems
        (detected as 1000 + 10·n consecutive draws without a new one; a nearly exhausted
        split can trip this too, and the message says so).
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        out: list[Problem] = []
        seen: set[str] = set()
        stale = 0
        for problem in self.stream(split, seed=seed):
            if len(out) == n:
                break
            if unique:
                k = self.key(problem)
                if k in seen:
                    stale += 1
                    if stale > 1000 + 10 * n:
                        raise ValueError(
                            f"task {self.name!r}: split {split!r} has fewer than n={n} "
                            f"distinct problems (found {len(out)}, then {stale - 1} draws "
                            "without a new one)"
                        )
                    continue
                seen.add(k)
                stale = 0
            out.append(problem)
        return out

    def train(self, n: int, *, seed: int = 0, unique: bool = True) -> list[Problem]:
        return self.generate("train", n, seed=seed, unique=unique)

    def heldout(self, n: int, *, seed: int = 0, unique: bool = True) -> list[Problem]:
        return self.generate("heldout", n, seed=seed, unique=unique)

    def reward_spec(self, *, format_weight: float = 0.0):
        """The task's default ``RewardSpec``: correctness (weight 1) [+ format reward]."""
        from rlx.rewards.spec import RewardComponent, RewardSpec  # lazy: rewards never import tasks

        comps = [RewardComponent(name) for name in self.reward_names()]
        if format_weight:
            comps.append(
                RewardComponent("format", weight=format_weight, kwargs={"pattern": self.format_pattern})
            )
        return RewardSpec(tuple(comps))

    def is_well_formed(self, completion: str) -> bool:
        return re.fullmatch(self.format_pattern, completion.strip()) is not None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def parse_range(value: int | tuple[int, int] | list[int], field: str, *, low: int = 1) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(1, 3)`` -> ``(1, 3)``; validates ``low <= lo <= hi``."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an int or (min, max), got {value!r}")
    if isinstance(value, int):
        lo = hi = value
    else:
        try:
            lo, hi = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{field} must be an int or (min, max), got {value!r}") from None
    if not low <= lo <= hi:
        raise ValueError(f"{field} must satisfy {low} <= min <= max, got {value!r}")
    return lo, hi
