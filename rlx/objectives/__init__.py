"""rlx.objectives: composable RL objectives (advantages, masks, surrogates, KL,
regularizers, aggregation, value and preference losses, presets).

Every public name of the submodules is re-exported here lazily: a submodule is
imported on first access of one of its names, so ``import rlx.objectives`` is cheap
and one broken submodule never breaks the others. Names are also reachable through
their submodule (``rlx.objectives.surrogates.ppo_clip_loss``).
"""

from __future__ import annotations

import importlib

_EXPORTS: dict[str, tuple[str, ...]] = {
    "types": ("TokenOutputs", "PolicyBatch", "RewardBatch", "AdvantageOutput", "LossOutput",
              "SurrogateInfo", "Regularizer", "Objective"),
    "aggregation": ("masked_mean", "safe_div", "token_mean", "seq_mean_token_sum",
                    "seq_mean_token_mean", "seq_mean_token_sum_norm", "AGGREGATIONS"),
    "ratios": ("log_ratio", "ratio", "ratio_metrics", "masked_stats"),
    "surrogates": ("ppo_clip_loss", "policy_gradient_loss", "importance_sampled_loss",
                   "gspo_loss", "gspo_token_loss", "gmpo_loss", "cispo_loss", "sapo_loss",
                   "bapo_candidates", "bapo_bounds", "bapo_loss", "truncated_is_weights"),
    "kl": ("kl_estimate", "kl_reward_penalty", "AdaptiveKLState", "adaptive_kl_init",
           "adaptive_kl_update"),
    "regularizers": ("kl_penalty", "entropy_bonus", "R2VPOState", "ratio_variance",
                     "r2vpo_init", "r2vpo_update", "ratio_variance_penalty"),
    "value": ("clipped_value_loss", "value_loss"),
    "preference": ("bradley_terry_loss", "dpo_loss", "ipo_loss", "simpo_loss",
                   "distillation_reverse_kl"),
    "compose": ("compose", "group_advantages", "check_batch", "check_rewards", "lengths_of"),
    "presets": ("grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "ppo",
                "bnpo", "gdpo", "bapo", "r2vpo", "sapo", "gmpo", "PRESETS"),
    "advantages": ("grpo_advantages", "dr_grpo_advantages", "batch_std_advantages",
                   "rloo_advantages", "remax_advantages", "opo_advantages",
                   "pass_at_k_advantages", "outcome_token_rewards", "discounted_returns",
                   "reinforce_pp_advantages", "reinforce_pp_baseline_advantages", "gae",
                   "bnpo_advantages", "BNPOState", "bnpo_init", "bnpo_update",
                   "gdpo_advantages", "combine_rewards"),
    "masks": ("zero_variance_group_mask", "max_variance_subset_mask", "top_score_token_mask",
              "D3SBudget", "d3s_schedule", "high_entropy_token_mask",
              "truncated_completion_mask", "forced_prefix_mask"),
    "shaping": ("overlong_penalty", "ngram_repetition_penalty", "repetition_loop_fraction",
                "RepetitionWeightState", "repetition_weight_init", "repetition_weight_update",
                "apply_repetition_penalty"),
    "groups": ("group_ids", "to_groups", "from_groups", "GroupedRows", "scatter_to_groups",
               "gather_from_groups", "broadcast_to_tokens", "Moments", "masked_moments",
               "whiten"),
    "offpolicy": ("level_log_ratio", "band_weights", "truncated_is", "masked_is",
                  "decoupled_is_weights", "mismatch_metrics", "mismatch_monitor", "monitored"),
}

_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


# The submodule ``compose`` shares its name with the function ``compose``: import it
# now and bind the function, so that a later ``import rlx.objectives.compose`` (which
# sets the package attribute only on first load) cannot shadow the function.
from rlx.objectives.compose import compose  # noqa: E402


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'rlx.objectives' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rlx.objectives.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
