"""A learned reward model as a reward function: a drop-in for ``RewardPool``.

``LearnedReward(graphdef, params, tokenizer).score(completions, problems)`` returns the
same ``RewardResult`` the pool returns (one component, named ``name``), so
``RLTrainer(reward_pool=LearnedReward(...))`` optimises a Bradley-Terry reward model
(``rlx.train.preference.train_reward_model``) instead of a verifier.

Scoring: each sample is tokenised exactly as the reward model's training pairs were
(``[bos] prompt | completion [eos]``, ``rlx.train.preference.pairs_to_batch``; the eos is
appended to every completion — a text carries no trace of whether the sampler stopped
or ran out of tokens, so a truncated completion is scored as if it had ended), and
the model's scalar at the last real token is its score. Rows are grouped by their own
padded width (the smallest of ``widths`` that fits, right padding) and run through
the jitted forward in fixed chunks of ``batch_size`` rows (short chunks padded with
empty rows), so there is one compilation per width and a sample's score does not
depend on which other samples share its batch. A sequence longer than the largest
width keeps its last ``widths[-1]`` tokens (the reward is read at the end) — or, with
``widths=None``, widths are powers of two from 16 up to the model's
``max_position_embeddings``.

Failures are isolated like the pool's: a sample that cannot be tokenised (non-string,
unknown characters that the tokenizer rejects) or whose score is not finite gets
``failure_value``, is flagged in ``failed`` and counted in ``failures``; the rest of
the batch is scored normally.

Normalisation (``normalize``): ``None`` (raw scores), ``"batch"`` (z-score over the
scored batch, ``(r − mean) / (std + 1e-6)``) or ``"fixed"`` (``(r − mean) / std`` with
the constructor's ``mean`` / ``std``, e.g. measured on the reward model's training
pairs: keeps a PPO return scale stable across steps). Group-normalising objectives
(GRPO family) are unaffected by an affine map within a group; ``"batch"`` still changes
their scale relative to a KL term.

``monitor``: an optional verifiable ``RewardPool`` that is also run on every batch; its
metrics are reported under ``reward/verifiable/…`` but never enter the scores, so a run
shows whether optimising the learned reward moves the real metric (reward hacking).

This module imports JAX; the rest of ``rlx.rewards`` does not (worker processes start
without it), so it is not re-exported by ``rlx.rewards``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlx.rewards.pool import RewardResult

NORMALIZE = (None, "batch", "fixed")
_MAX_ERRORS = 8


@dataclasses.dataclass(frozen=True)
class LearnedRewardResult(RewardResult):
    """A ``RewardResult`` with extra metrics (the monitor's and the raw-score mean)."""

    extra: dict = dataclasses.field(default_factory=dict)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        return {**super().metrics(prefix), **self.extra}


@functools.lru_cache(maxsize=8)
def _forward(graphdef):
    from rlx.models import api

    def fn(params, tokens, mask):
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        return api.rewards(graphdef, params, tokens, positions, mask)

    return jax.jit(fn)


class LearnedReward:
    """Scores completions with a reward model (see the module docstring).

    Args:
      graphdef, params: the reward model (``api.init(cfg, kind="reward")``).
      tokenizer: the tokenizer the reward model was trained with.
      name: the component name in ``RewardResult.names`` and metrics.
      widths: padded sequence widths (ascending); None = powers of two from 16.
      batch_size: rows per forward call (fixed, so shapes never change).
      normalize, mean, std: see the module docstring.
      failure_value: the score of a sample that failed.
      monitor: an optional verifiable ``RewardPool`` reported alongside.
    """

    def __init__(self, graphdef, params, tokenizer, *, name: str = "learned",
                 widths: Sequence[int] | None = None, batch_size: int = 32,
                 normalize: str | None = None, mean: float = 0.0, std: float = 1.0,
                 failure_value: float = 0.0, monitor=None):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be finite and > 0, got {std!r}")
        if not math.isfinite(mean):
            raise ValueError(f"mean must be finite, got {mean!r}")
        if not math.isfinite(failure_value):
            raise ValueError(f"failure_value must be finite, got {failure_value!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if widths is None:
            top = getattr(getattr(graphdef, "cfg", None), "max_position_embeddings", None)
            top = top or 1024
            widths = [16]
            while widths[-1] < top:
                widths.append(min(widths[-1] * 2, top))
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 1 for w in widths) or list(widths) != sorted(set(widths)):
            raise ValueError(f"widths must be positive and strictly increasing, got {widths!r}")
        self.graphdef, self.params, self.tokenizer = graphdef, params, tokenizer
        self.name, self.widths, self.batch_size = name, widths, int(batch_size)
        self.normalize, self.mean, self.std = normalize, float(mean), float(std)
        self.failure_value = float(failure_value)
        self.monitor = monitor
        self._fn = _forward(graphdef)

    # ------------------------------------------------------------------ pieces
    def encode(self, prompt: str, completion: str) -> list[int]:
        """``[bos] prompt completion [eos]`` token ids (the training-pair layout)."""
        tok = self.tokenizer
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt) \
            + tok.encode(completion) + ([tok.eos_id] if tok.eos_id is not None else [])
        return ids[-self.widths[-1]:]

    def width_for(self, length: int) -> int:
        return next(w for w in self.widths if w >= length)

    def raw_scores(self, rows: Sequence[list[int]]) -> np.ndarray:
        """Reward-model scores [B] float32 of token rows (each ≤ ``widths[-1]``)."""
        out = np.zeros(len(rows), np.float32)
        by_width: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_width.setdefault(self.width_for(max(len(row), 1)), []).append(i)
        pad = self.tokenizer.pad_id
        for width, idx in sorted(by_width.items()):
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                tokens = np.full((self.batch_size, width), pad, np.int32)
                mask = np.zeros((self.batch_size, width), bool)
                for j, i in enumerate(chunk):
                    tokens[j, :len(rows[i])] = rows[i]
                    mask[j, :len(rows[i])] = True
                scores = np.asarray(self._fn(self.params, tokens, mask))
                out[chunk] = scores[:len(chunk)]
        return out

    # ----------------------------------------------------------------- scoring
    def score(self, completions: Sequence[str], problems: Sequence[Any]) -> RewardResult:
        """Scores ``completions[i]`` as a response to ``problems[i].prompt``."""
        if len(completions) != len(problems):
            raise ValueError(f"completions has {len(completions)} entries but problems "
                             f"has {len(problems)}")
        start = time.perf_counter()
        b = len(completions)
        failed = np.zeros(b, bool)
        errors: list[str] = []
        rows: list[list[int]] = []
        for i, (text, problem) in enumerate(zip(completions, problems)):
            try:
                rows.append(self.encode(problem.prompt, text))
            except Exception as e:  # noqa: BLE001 - isolate any tokenisation failure
                failed[i] = True
                rows.append([])
                if len(errors) < _MAX_ERRORS:
                    errors.append(f"{self.name}: sample {i}: {type(e).__name__}: {e}")
        ok = np.flatnonzero(~failed)
        raw = np.full(b, np.nan, np.float32)
        if ok.size:
            raw[ok] = self.raw_scores([rows[i] for i in ok])
        bad = ~failed & ~np.isfinite(raw)
        if bad.any() and len(errors) < _MAX_ERRORS:
            errors.append(f"{self.name}: {int(bad.sum())} non-finite score(s)")
        failed |= bad
        scores = self._normalized(raw, failed)
        extra = {f"reward/{self.name}_raw_mean":
                 float(raw[~failed].mean()) if (~failed).any() else 0.0}
        if self.monitor is not None and b:
            extra.update(self.monitor.score(completions, problems)
                         .metrics(prefix="reward/verifiable/"))
        return LearnedRewardResult(
            scores=scores, components=scores[:, None].copy(), names=(self.name,),
            failed=failed, failures=int(failed.sum()), timeouts=0,
            errors=tuple(errors), seconds=time.perf_counter() - start, extra=extra)

    def _normalized(self, raw: np.ndarray, failed: np.ndarray) -> np.ndarray:
        good = raw[~failed].astype(np.float64)
        if self.normalize == "batch" and good.size:
            out = (raw - good.mean()) / (good.std() + 1e-6)
        elif self.normalize == "fixed":
            out = (raw - self.mean) / self.std
        else:
            out = raw.astype(np.float64)
        return np.where(failed, self.failure_value, out).astype(np.float32)

    def close(self) -> None:
        """Closes the monitor pool, if any (the model needs no cleanup)."""
        if self.monitor is not None:
            self.monitor.close()

    def __enter__(self) -> "LearnedReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
