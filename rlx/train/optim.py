"""Optimizer construction (gin-configurable as ``rlx.train.optimizer``): AdamW with
warmup + schedule and gradient clipping.

Who sets what: the recipes pass the per-phase settings themselves — ``learning_rate``
(``rlx.Experiment.rl_lr`` / ``sft_lr`` / ``critic_lr``, ``rlx.RLHFExperiment.rm_lr``,
``rlx.DPOExperiment.dpo_lr``) and the schedule (``schedule``, ``warmup_steps``,
``total_steps``, ``end_factor``: cosine with a short warmup for the SFT, reward-model
and DPO phases, constant for RL) — so binding those here is an error raised before
anything is built (``rlx.recipes.bindings``). The AdamW and clipping settings
(``weight_decay``, ``b1``, ``b2``, ``eps``, ``grad_clip``) are bound here and apply to
every phase, e.g. ``rlx.train.optimizer.weight_decay = 0.01``.
"""

from __future__ import annotations

import gin
import optax

#: parameters every recipe passes per phase (binding them in gin is refused).
PHASE_PARAMETERS = ("learning_rate", "schedule", "warmup_steps", "total_steps", "end_factor")


@gin.configurable(module="rlx.train")
def optimizer(*, learning_rate: float = 1e-5, schedule: str = "constant",
              warmup_steps: int = 0, total_steps: int = 1000, end_factor: float = 0.0,
              weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, grad_clip: float | None = 1.0
              ) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) → AdamW(lr(step)).

    schedule: "constant" | "linear" | "cosine" (decaying to ``end_factor``·lr at
    ``total_steps``), each after ``warmup_steps`` of linear warmup from 0.
    grad_clip: None or 0 turns clipping off.
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"optimizer.schedule={schedule!r}: expected constant, linear or cosine")
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    elif schedule == "linear":
        main = optax.linear_schedule(learning_rate, learning_rate * end_factor, decay_steps)
    else:
        main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_factor)
    lr = main
    if warmup_steps:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), main], [warmup_steps])
    parts = []
    if grad_clip:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def constant(learning_rate: float) -> optax.GradientTransformation:
    """The RL phases' optimizer: ``learning_rate`` throughout, no warmup."""
    return optimizer(learning_rate=learning_rate, schedule="constant", warmup_steps=0)


def warmup_cosine(learning_rate: float, steps: int) -> optax.GradientTransformation:
    """The fixed-length phases' optimizer (SFT, reward model, DPO): min(10, steps) warmup
    steps, then cosine decay to 0.1·``learning_rate`` at ``steps``."""
    return optimizer(learning_rate=learning_rate, schedule="cosine",
                     warmup_steps=min(10, steps), total_steps=steps, end_factor=0.1)
