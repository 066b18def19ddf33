"""The scores of one batch (``RewardPool.score``) and the check for a reward that never works."""

from __future__ import annotations

import dataclasses

import numpy as np


class RewardFailedError(RuntimeError):
    """A reward component failed on every sample of a batch (``raise_if_all_failed``)."""


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Scores of one batch, in input order.

    Attributes:
      scores: ``[B]`` float32 weighted totals ``Σ_k w_k · components[:, k]`` (what the
        loop trains on).
      components: ``[B, K]`` float32 per-component scores (failed calls hold
        ``failure_value``), for GDPO-style multi-reward objectives.
      names: the K component names.
      failed: ``[B]`` bool, True where any call of the sample failed or timed out.
      failures: calls that raised, returned a non-number / non-finite value, or during
        which the worker process died (includes ``crashes``).
      timeouts: calls that exceeded their time limit.
      errors: up to 8 ``"name: message"`` strings describing failures, for logs.
      seconds: wall time of the ``score`` call.
      crashes: calls during which the worker process died (segfault, ``os._exit``,
        killed by the OS); the worker was replaced and scoring went on.
      component_failures: ``[K]`` int, ``failures`` per component.
      component_timeouts: ``[K]`` int, ``timeouts`` per component.
      component_errors: K strings, the first error message of each component ("" if none).

    A sample whose call killed its worker fails as a whole: its other components hold
    ``failure_value`` too but are not counted as their failures.
    """

    scores: np.ndarray
    components: np.ndarray
    names: tuple[str, ...]
    failed: np.ndarray
    failures: int
    timeouts: int
    errors: tuple[str, ...]
    seconds: float
    crashes: int = 0
    component_failures: np.ndarray | None = None
    component_timeouts: np.ndarray | None = None
    component_errors: tuple[str, ...] | None = None

    def __post_init__(self):
        k = len(self.names)
        if self.component_failures is None:  # one component, or counts not split by component
            split = np.zeros(k, np.int64)
            if k:
                split[0] = self.failures if k == 1 else 0
            object.__setattr__(self, "component_failures", split)
        if self.component_timeouts is None:
            split = np.zeros(k, np.int64)
            if k == 1:
                split[0] = self.timeouts
            object.__setattr__(self, "component_timeouts", split)
        if self.component_errors is None:
            first = self.errors[0].partition(": ")[2] if (k == 1 and self.errors) else ""
            object.__setattr__(self, "component_errors", (first,) + ("",) * (k - 1) if k else ())

    @property
    def all_failed(self) -> tuple[str, ...]:
        """Names of the components that failed or timed out on every sample (a
        non-empty batch); empty when each component scored at least one sample."""
        b = int(self.scores.shape[0])
        if not b:
            return ()
        bad = np.asarray(self.component_failures) + np.asarray(self.component_timeouts)
        return tuple(n for n, c in zip(self.names, bad) if c >= b)

    def raise_if_all_failed(self) -> None:
        """Raises ``RewardFailedError`` naming each component in ``all_failed`` and its
        first error message (e.g. a reward missing a required argument). Meant for the
        loop after its first scored batch, where a reward that never works is a
        configuration error rather than a bad sample."""
        names = self.all_failed
        if not names:
            return
        b = int(self.scores.shape[0])
        parts = []
        for name in names:
            msg = self.component_errors[self.names.index(name)] or "no message"
            parts.append(f"reward {name!r} failed on all {b} samples of the batch: {msg}")
        raise RewardFailedError("; ".join(parts))

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat scalar metrics: ``mean`` total, mean per component, ``failures``,
        ``timeouts``, ``crashes``, ``seconds``, and with several components
        ``<name>/failures`` and ``<name>/timeouts``. Counts add up over batches."""
        out = {f"{prefix}mean": float(self.scores.mean()) if self.scores.size else 0.0}
        for k, name in enumerate(self.names):
            out[f"{prefix}{name}"] = float(self.components[:, k].mean()) if self.scores.size else 0.0
        out[f"{prefix}failures"] = float(self.failures)
        out[f"{prefix}timeouts"] = float(self.timeouts)
        out[f"{prefix}crashes"] = float(self.crashes)
        out[f"{prefix}seconds"] = float(self.seconds)
        if len(self.names) > 1:
            for k, name in enumerate(self.names):
                out[f"{prefix}{name}/failures"] = float(self.component_failures[k])
                out[f"{prefix}{name}/timeouts"] = float(self.component_timeouts[k])
        return out
