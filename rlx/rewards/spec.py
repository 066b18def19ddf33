"""Reward-function protocol, registry and weighted multi-reward specs.

Protocol: a reward function is ``fn(completion: str, problem) -> float`` where
``problem`` has ``.prompt``, ``.answer`` and ``.meta`` (``rlx.tasks.Problem`` or a user
record). Extra hyperparameters are keyword-only and bound per component.

A ``RewardSpec`` is an ordered tuple of K components ``(name, weight, kwargs)``. Scoring
one sample gives the per-component vector ``r ∈ R^K`` and the total
``R = Σ_k w_k · r_k``; the per-component ``[B, K]`` matrix is what GDPO-style
multi-reward normalisation (arXiv:2601.05242: normalise each reward within the group
before summing) consumes, the ``[B]`` total is what single-reward GRPO consumes.

Components resolve their function at construction (from the registry when only a name
is given), so a spec pickles by function reference and can be shipped to worker
processes; functions must therefore be module-level for the process pool.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import gin
import numpy as np


class RewardFn(Protocol):
    def __call__(self, completion: str, problem: Any, /) -> float: ...


_REWARDS: dict[str, Callable[..., float]] = {}


def register_reward(name: str, fn: Callable[..., float] | None = None):
    """Registers ``fn`` under ``name``; usable as ``@register_reward("name")``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def deco(f: Callable[..., float]) -> Callable[..., float]:
        _REWARDS[name] = f
        return f

    return deco(fn) if fn is not None else deco


def get_reward(name: str) -> Callable[..., float]:
    try:
        return _REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward name {name!r}; available: {available_rewards()}") from None


def available_rewards() -> tuple[str, ...]:
    return tuple(sorted(_REWARDS))


@dataclasses.dataclass(frozen=True)
class RewardComponent:
    """One weighted reward term.

    Args:
      name: registry name, or a label when ``fn`` is given.
      weight: ``w_k`` in the total (finite).
      kwargs: keyword arguments bound to the function.
      fn: the function; looked up in the registry by ``name`` when None.
    """

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    fn: Callable[..., float] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        w = self.weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")
        if self.fn is None:
            object.__setattr__(self, "fn", get_reward(self.name))
        elif not callable(self.fn):
            raise ValueError(f"reward {self.name!r}: fn must be callable, got {self.fn!r}")
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    def __call__(self, completion: str, problem: Any) -> float:
        return self.fn(completion, problem, **self.kwargs)


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """An ordered tuple of K ``RewardComponent`` with distinct names."""

    components: tuple[RewardComponent, ...]

    def __post_init__(self):
        comps = tuple(self.components)
        if not comps:
            raise ValueError("RewardSpec.components must not be empty")
        for c in comps:
            if not isinstance(c, RewardComponent):
                raise ValueError(f"RewardSpec.components must hold RewardComponent, got {c!r}")
        names = [c.name for c in comps]
        if len(set(names)) != len(names):
            raise ValueError(f"RewardSpec component names must be distinct, got {names}")
        object.__setattr__(self, "components", comps)

    def __len__(self) -> int:
        return len(self.components)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    @property
    def weights(self) -> np.ndarray:
        """``[K]`` float64 weights."""
        return np.asarray([c.weight for c in self.components], dtype=np.float64)

    def total(self, components: np.ndarray) -> np.ndarray:
        """``[..., K]`` per-component scores -> ``[...]`` weighted totals."""
        return np.asarray(components, dtype=np.float64) @ self.weights

    def score(self, completion: str, problem: Any) -> tuple[float, np.ndarray]:
        """In-process scoring of one sample: ``(total, [K] components)``; exceptions
        propagate (the worker pool is where failures are isolated)."""
        parts = np.asarray([check_score(c.name, c(completion, problem)) for c in self.components])
        return float(parts @ self.weights), parts


def check_score(name: str, value: Any) -> float:
    """``float(value)``, raising ValueError for a non-number or a non-finite number."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (str, bytes)):
        raise ValueError(f"reward {name!r} returned {type(value).__name__}, expected a float")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"reward {name!r} returned {type(value).__name__}, expected a float") from None
    if not math.isfinite(out):
        raise ValueError(f"reward {name!r} returned a non-finite value {out!r}")
    return out


@gin.configurable(module="rlx.rewards")
def reward_spec(
    names: Sequence[str] = ("numeric_exact_match",),
    weights: Sequence[float] | None = None,
    kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> RewardSpec:
    """Gin-friendly constructor: ``reward_spec(("countdown", "format"), (1.0, 0.1),
    {"format": {"pattern": "[0-9+*/() -]+"}})``."""
    names = tuple(names)
    weights = (1.0,) * len(names) if weights is None else tuple(weights)
    if len(weights) != len(names):
        raise ValueError(f"weights has {len(weights)} entries for {len(names)} names {names}")
    kwargs = dict(kwargs or {})
    unknown = set(kwargs) - set(names)
    if unknown:
        raise ValueError(f"kwargs given for rewards not in names: {sorted(unknown)}")
    return RewardSpec(
        tuple(RewardComponent(n, float(w), kwargs.get(n, {})) for n, w in zip(names, weights))
    )


def bind(fn: Callable[..., float], **kwargs: Any) -> Callable[[str, Any], float]:
    """``functools.partial`` with a name, for ad-hoc components."""
    return functools.partial(fn, **kwargs)
