"""Loss aggregation modes returning exactly splittable (numerator, denominator) pairs.

Each mode maps a per-token loss ℓ [B,T] and mask m [B,T] to ``(num, den)`` where
both are sums over rows, so that for any split of the batch into micro-batches or
devices, ``Σ num / Σ den`` equals the full-batch value:

* ``token_mean``: num = Σ_{i,t} ℓ m, den = Σ_{i,t} m.
* ``seq_mean_token_sum``: num = Σ_i Σ_t ℓ m, den = #sequences.
* ``seq_mean_token_mean``: num = Σ_i (Σ_t ℓ m / Σ_t m), den = #sequences.
* ``seq_mean_token_sum_norm`` (Dr.GRPO, arXiv 2503.20783): num = Σ_i Σ_t ℓ m / L,
  den = #sequences, with L a constant (the generation budget).

"#sequences" counts rows with at least one valid token, so rows removed by a
selection mask (e.g. zero-variance groups) do not dilute the mean. An all-masked
batch gives (0, 0); ``safe_div`` turns that into loss 0. The engine combines
micro-batches as described in ``rlx.objectives.types``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def psum(x: Array, axis_name: str | None) -> Array:
    """``lax.psum`` over ``axis_name`` when given, identity otherwise."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def safe_div(num: Array, den: Array) -> Array:
    """num / max(den, 1): den is a count, so an empty batch gives 0, not NaN."""
    return num / jnp.maximum(den, 1.0)


def masked(x: Array, mask: Array) -> Array:
    """x where mask else 0 (NaN/inf-safe: garbage in padded positions never leaks)."""
    return jnp.where(mask > 0, x, jnp.zeros_like(x))


def masked_mean(x: Array, mask: Array, *, axis_name: str | None = None) -> Array:
    """Global masked mean over all valid tokens (psum over ``axis_name``)."""
    m = mask.astype(x.dtype)
    return safe_div(psum(masked(x, m).sum(), axis_name), psum(m.sum(), axis_name))


def _row_valid(mask: Array, dtype) -> tuple[Array, Array]:
    m = mask.astype(dtype)
    return m, (m.sum(-1) > 0).astype(dtype)


def token_mean(loss: Array, mask: Array) -> tuple[Array, Array]:
    """Σ ℓ m / Σ m (DAPO token-level loss)."""
    m = mask.astype(loss.dtype)
    return masked(loss, m).sum(), m.sum()


def seq_mean_token_sum(loss: Array, mask: Array) -> tuple[Array, Array]:
    """(1/B') Σ_i Σ_t ℓ m, B' = rows with a valid token."""
    m, valid = _row_valid(mask, loss.dtype)
    return masked(loss, m).sum(), valid.sum()


def seq_mean_token_mean(loss: Array, mask: Array) -> tuple[Array, Array]:
    """(1/B') Σ_i [Σ_t ℓ m / Σ_t m] (GRPO, arXiv 2402.03300)."""
    m, valid = _row_valid(mask, loss.dtype)
    per_row = safe_div(masked(loss, m).sum(-1), m.sum(-1))
    return per_row.sum(), valid.sum()


def seq_mean_token_sum_norm(
    loss: Array, mask: Array, *, norm_constant: float
) -> tuple[Array, Array]:
    """(1/B') Σ_i Σ_t ℓ m / L with L = ``norm_constant`` (Dr.GRPO's generation budget)."""
    if not norm_constant > 0:
        raise ValueError(f"norm_constant must be > 0, got {norm_constant!r}")
    m, valid = _row_valid(mask, loss.dtype)
    return masked(loss, m).sum() / norm_constant, valid.sum()


AGGREGATIONS = {
    "token_mean": token_mean,
    "seq_mean_token_sum": seq_mean_token_sum,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}
