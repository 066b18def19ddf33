"""``SamplerConfig``: the static (hashable) settings of one ``generate`` call."""

from __future__ import annotations

import dataclasses
from typing import Literal

import gin

from rlx.sampling.buckets import (DEFAULT_COMPLETION_BUCKETS, DEFAULT_PROMPT_BUCKETS,
                                  check_buckets)

PrefixCache = Literal["shared", "repeat", "reprefill"]
PREFIX_CACHES = ("shared", "repeat", "reprefill")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Sampling controls and rollout shape.

    Attributes:
      max_new_tokens: completion length limit (≥ 1); forced-prefix tokens count.
      num_generations: G completions per prompt; rows are ordered b = p·G + g.
      temperature: τ; 0 means greedy (argmax; sampling log-prob 0).
      top_k: keep the k most likely tokens (0 = off).
      top_p: nucleus mass (1 = off).
      min_p: keep tokens with p ≥ min_p · p_max (0 = off).
      stop_token_ids: a sampled stop token ends its row; the stop token itself is part
        of the completion (it is in the completion mask and the length). Forced-prefix
        tokens never end a row.
      forbidden_token_ids: never sampled (logit set to −∞ before everything else).
      pad_id: filler for prompt padding and for completion slots after a row ended.
      return_policy_logprobs: also return log π(y_t) of the untruncated policy at
        temperature 1 (for importance ratios).
      prefix_cache: how the G rows of a group get the prompt's KV entries:
        "shared"    prefill each prompt once; rows read one shared prefix (no copy);
        "repeat"    prefill each prompt once, then copy its KV entries G times;
        "reprefill" the naive baseline: repeat the prompt G times and prefill P·G rows.
      prompt_buckets, completion_buckets: see ``rlx.sampling.buckets``.
      overlong_prompt: "error" (default) or "truncate_left" (keep the last
        max(prompt_buckets) tokens of a longer prompt).
    """

    max_new_tokens: int = 256
    num_generations: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    forbidden_token_ids: tuple[int, ...] = ()
    pad_id: int = 0
    return_policy_logprobs: bool = False
    prefix_cache: PrefixCache = "shared"
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    completion_buckets: tuple[int, ...] = DEFAULT_COMPLETION_BUCKETS
    overlong_prompt: Literal["error", "truncate_left"] = "error"

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"SamplerConfig.{field}={getattr(self, field)!r}: {why}")

        for name in ("stop_token_ids", "forbidden_token_ids", "prompt_buckets",
                     "completion_buckets"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not isinstance(self.num_generations, int) or self.num_generations < 1:
            bad("num_generations", "must be an integer >= 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 = off)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0 = off)")
        if any(i < 0 for i in self.stop_token_ids + self.forbidden_token_ids):
            bad("stop_token_ids" if any(i < 0 for i in self.stop_token_ids)
                else "forbidden_token_ids", "token ids must be >= 0")
        if self.prefix_cache not in PREFIX_CACHES:
            bad("prefix_cache", f"must be one of {PREFIX_CACHES}")
        if self.overlong_prompt not in ("error", "truncate_left"):
            bad("overlong_prompt", "must be 'error' or 'truncate_left'")
        check_buckets("SamplerConfig.prompt_buckets", self.prompt_buckets)
        check_buckets("SamplerConfig.completion_buckets", self.completion_buckets)
        if self.max_new_tokens > max(self.completion_buckets):
            bad("max_new_tokens", f"exceeds the largest completion bucket "
                f"{max(self.completion_buckets)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids in range, and at least one token left to sample."""
        for name in ("stop_token_ids", "forbidden_token_ids"):
            out = [i for i in getattr(self, name) if i >= vocab_size]
            if out:
                raise ValueError(f"SamplerConfig.{name}: ids {out} >= vocab_size {vocab_size}")
        if len(set(self.forbidden_token_ids)) >= vocab_size:
            raise ValueError("SamplerConfig.forbidden_token_ids forbids the whole vocabulary")

    def replace(self, **changes) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)
