"""Host-side reward functions, weighted multi-reward specs and the reward worker pool.

Reward protocol: ``fn(completion: str, problem) -> float`` (``problem`` has ``.prompt``,
``.answer``, ``.meta``), or with ``@batched``, ``fn(completions, problems) -> list[float]``.
Registered rewards: ``numeric_exact_match``, ``final_answer_match``, ``math_answer``,
``countdown``, ``sorting``, ``format``; any other name is read as an import path of a
user's function (``"my_rewards.brevity"``, ``"my_rewards:brevity"``,
``"/tmp/x/my_rewards.py:brevity"``; ``rlx.rewards.references``). This package never
imports JAX, so worker processes start fast.
"""

from rlx.rewards.countdown import ExpressionError, countdown_reward, evaluate_expression, extract_expression
from rlx.rewards.exact import final_answer_match, numeric_exact_match
from rlx.rewards.extract import extract_answer, extract_boxed, parse_number
from rlx.rewards.format import format_reward
from rlx.rewards.math_check import available_backend, math_answer, sympy_equal
from rlx.rewards.pool import RewardPool
from rlx.rewards.references import batched
from rlx.rewards.result import RewardFailedError, RewardResult
from rlx.rewards.sorting import sorting_reward
from rlx.rewards.spec import (
    RewardComponent,
    RewardFn,
    RewardSpec,
    available_rewards,
    get_reward,
    register_reward,
    reward_spec,
)

__all__ = [
    "ExpressionError",
    "RewardComponent",
    "RewardFailedError",
    "RewardFn",
    "RewardPool",
    "RewardResult",
    "RewardSpec",
    "available_backend",
    "available_rewards",
    "batched",
    "countdown_reward",
    "evaluate_expression",
    "extract_answer",
    "extract_boxed",
    "extract_expression",
    "final_answer_match",
    "format_reward",
    "get_reward",
    "math_answer",
    "numeric_exact_match",
    "parse_number",
    "register_reward",
    "reward_spec",
    "sorting_reward",
    "sympy_equal",
]
