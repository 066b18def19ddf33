"""Reward-function protocol, registry and weighted multi-reward specs.

Protocol: a reward function is ``fn(completion: str, problem) -> float`` where
``problem`` has ``.prompt``, ``.answer`` and ``.meta`` (``rlx.tasks.Problem`` or a user
record), or, decorated with ``@rlx.rewards.batched`` (or with ``batched=True`` on its
component), ``fn(completions: list[str], problems: list) -> list[float]``. Extra
hyperparameters are keyword-only and bound per component.

A ``RewardSpec`` is an ordered tuple of K components ``(name, weight, kwargs)``. Scoring
one sample gives the per-component vector ``r ∈ R^K`` and the total
``R = Σ_k w_k · r_k``; the per-component ``[B, K]`` matrix is what GDPO-style
multi-reward normalisation (arXiv:2601.05242: normalise each reward within the group
before summing) consumes, the ``[B]`` total is what single-reward GRPO consumes.

Components resolve their function at construction: from the registry when the name is
registered, else from the name read as an import path (``"my_rewards.brevity"``,
``"my_rewards:brevity"``, ``"/tmp/x/my_rewards.py:brevity"``; ``rlx.rewards.references``).
A component loaded from a path pickles as that path, so worker processes import the
user's module themselves; a component given ``fn=`` pickles it by reference
(``references.dumps``), so it must be module-level (or in the training script) for the
process pool.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import gin
import numpy as np

from rlx.rewards import references


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
    """The registered function ``name``, or the function the import path ``name`` names."""
    if name in _REWARDS:
        return _REWARDS[name]
    if references.is_reference(name):
        return references.load_reference(name)
    raise ValueError(
        f"unknown reward name {name!r}; available: {available_rewards()}, or an import path "
        "such as 'my_rewards.fn', 'my_rewards:fn' or '/path/to/my_rewards.py:fn'"
    )


def available_rewards() -> tuple[str, ...]:
    return tuple(sorted(_REWARDS))


@dataclasses.dataclass(frozen=True)
class RewardComponent:
    """One weighted reward term.

    Args:
      name: registry name, an import path (``"my_rewards.brevity"``; see
        ``rlx.rewards.references``), or a label when ``fn`` or ``ref`` is given.
      weight: ``w_k`` in the total (finite).
      kwargs: keyword arguments bound to the function.
      fn: the function; resolved from ``ref`` or ``name`` when None.
      batched: whether ``fn`` takes lists (``fn(completions, problems) -> list``);
        None reads the ``@rlx.rewards.batched`` mark.
      ref: an import path to load ``fn`` from (with ``name`` as the label). Filled in
        with the canonical path when the function was loaded from one; a component
        with a ``ref`` pickles as it, and unpickling re-imports the module.
    """

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    fn: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)
    batched: bool | None = None
    ref: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"reward name must be a non-empty string, got {self.name!r}")
        w = self.weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")
        fn, ref = self.fn, self.ref
        if fn is not None and ref is not None:
            raise ValueError(f"reward {self.name!r}: give fn or ref, not both")
        if fn is None:
            if ref is None and (self.name in _REWARDS or not references.is_reference(self.name)):
                fn = get_reward(self.name)
            else:
                fn, ref = references.resolve(self.name if ref is None else ref)
        elif not callable(fn):
            raise ValueError(f"reward {self.name!r}: fn must be callable, got {fn!r}")
        if self.batched is not None and not isinstance(self.batched, (bool, np.bool_)):
            raise ValueError(f"reward {self.name!r}: batched must be True, False or None, got {self.batched!r}")
        batched = references.is_batched(fn) if self.batched is None else bool(self.batched)
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "ref", ref)
        object.__setattr__(self, "batched", batched)
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    def __reduce_ex__(self, protocol):
        if self.ref is not None:  # send the import path; the receiver imports the module
            return _component_from_ref, (self.name, self.weight, self.kwargs, self.batched, self.ref)
        return object.__reduce_ex__(self, protocol)

    def __call__(self, completion: str, problem: Any) -> Any:
        """One sample's raw score (a batched function is called with one-element lists)."""
        if self.batched:
            (out,) = check_batch(self.name, self.fn([completion], [problem], **self.kwargs), 1)
            if isinstance(out, ValueError):
                raise out
            return out
        return self.fn(completion, problem, **self.kwargs)

    def call_batch(self, completions: list[str], problems: list[Any]) -> Any:
        """The raw result of a batched function on lists (checked by ``check_batch``)."""
        return self.fn(completions, problems, **self.kwargs)


def _component_from_ref(name, weight, kwargs, batched, ref) -> RewardComponent:
    return RewardComponent(name, weight, kwargs, batched=batched, ref=ref)


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
    def batched(self) -> tuple[bool, ...]:
        return tuple(c.batched for c in self.components)

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


def check_batch(name: str, value: Any, n: int) -> list[float | ValueError]:
    """A batched reward's result as n floats; entries that are not finite numbers are
    returned as the ``ValueError`` describing them. Raises ValueError when ``value`` is
    not a sequence of n entries."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or \
            not hasattr(value, "__iter__"):
        raise ValueError(f"batched reward {name!r} returned {type(value).__name__}, "
                         f"expected a list of {n} floats")
    entries = list(value)
    if len(entries) != n:
        raise ValueError(f"batched reward {name!r} returned {len(entries)} scores for {n} samples")
    out: list[float | ValueError] = []
    for v in entries:
        try:
            out.append(check_score(name, v))
        except ValueError as e:
            out.append(e)
    return out


@gin.configurable(module="rlx.rewards")
def reward_spec(
    names: Sequence[str] = ("numeric_exact_match",),
    weights: Sequence[float] | None = None,
    kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batched: Sequence[str] = (),
) -> RewardSpec:
    """Gin-friendly constructor: ``reward_spec(("countdown", "format"), (1.0, 0.1),
    {"format": {"pattern": "[0-9+*/() -]+"}})``.

    ``names`` holds registry names or import paths of user functions
    (``"my_rewards.brevity"``, ``"my_rewards:brevity"``, ``"/tmp/x/my_rewards.py:brevity"``);
    ``batched`` lists the names whose functions take lists (needed only for functions
    not decorated with ``@rlx.rewards.batched``)."""
    names = tuple(names)
    weights = (1.0,) * len(names) if weights is None else tuple(weights)
    if len(weights) != len(names):
        raise ValueError(f"weights has {len(weights)} entries for {len(names)} names {names}")
    kwargs = dict(kwargs or {})
    unknown = set(kwargs) - set(names)
    if unknown:
        raise ValueError(f"kwargs given for rewards not in names: {sorted(unknown)}")
    if isinstance(batched, str):
        raise ValueError(f"batched must be a sequence of names, got the string {batched!r}")
    batched = set(batched)
    if batched - set(names):
        raise ValueError(f"batched names rewards not in names: {sorted(batched - set(names))}")
    for n, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"reward_spec.weights: weight of {n!r} must be a number, got {w!r}")
    return RewardSpec(tuple(
        RewardComponent(n, float(w), kwargs.get(n, {}), batched=True if n in batched else None)
        for n, w in zip(names, weights)))


def bind(fn: Callable[..., float], **kwargs: Any) -> Callable[[str, Any], float]:
    """``functools.partial`` with a name, for ad-hoc components."""
    return functools.partial(fn, **kwargs)
