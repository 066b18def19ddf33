"""Format reward: 1.0 when the stripped completion fully matches a regular expression.

``format_reward(completion, problem, pattern=r"-?[0-9]+")``. Completions longer than
``max_chars`` score 0 without running the pattern. Each task exposes its pattern as
``Task.format_pattern`` and ``Task.reward_spec(format_weight=w)`` adds this reward.
Patterns are configuration, not model output: keep them free of nested quantifiers.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from rlx.rewards.spec import register_reward


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.ASCII | re.DOTALL)


@register_reward("format")
def format_reward(completion: str, problem: Any, *, pattern: str, max_chars: int = 10_000) -> float:
    """1.0 if ``re.fullmatch(pattern, completion.strip())`` (ASCII classes), else 0.0."""
    if len(completion) > max_chars:
        return 0.0
    return 1.0 if _compile(pattern).fullmatch(completion.strip()) else 0.0
