"""Optimizer construction (gin-configurable): AdamW with warmup + schedule and clipping."""

from __future__ import annotations

import gin
import optax


@gin.configurable
def optimizer(*, learning_rate: float = 1e-5, schedule: str = "constant",
              warmup_steps: int = 0, total_steps: int = 1000, end_factor: float = 0.0,
              weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, grad_clip: float | None = 1.0
              ) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) → AdamW(lr(step)).

    schedule: "constant" | "linear" | "cosine" (decaying to ``end_factor``·lr at
    ``total_steps``), each after ``warmup_steps`` of linear warmup from 0.
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
