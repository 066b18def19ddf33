"""Between flat rows and prompt groups; masked moments and whitening.

Conventions used by every objective module:

* Sequence-level quantities live in group form ``[P, G]`` (P prompts, G rollouts per
  prompt) or in flat form ``[B]`` with ``B = P * G`` and rows in prompt-major order
  (row ``b = p * G + g``), so ``group_ids = arange(B) // G``.
* Token-level quantities are ``[B, T]`` with a float/bool ``mask [B, T]`` (1 = a
  completion token that counts).
* A non-finite sequence reward means "missing sample": estimators leave it out of the
  statistics and give it a zero advantage. :func:`scatter_to_groups` uses the same
  convention (NaN) for the empty slots of ragged groups, so ragged groups just work.

All functions are pure and jittable; shape errors raise ``ValueError`` naming the field.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


# --------------------------------------------------------------------------- checks
def check_rank(name: str, x: Array, rank: int | Sequence[int]) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``x.ndim`` is (one of) ``rank``."""
    try:
        chex.assert_rank(x, set(rank) if not isinstance(rank, int) else rank)
    except AssertionError as err:
        raise ValueError(
            f"{name} must have rank {rank}, got shape {tuple(jnp.shape(x))}"
        ) from err


def check_shape(name: str, x: Array, shape: Sequence[int | None]) -> None:
    """Raises ``ValueError`` unless ``x.shape`` matches ``shape`` (None = any size)."""
    try:
        chex.assert_shape(x, tuple(shape))
    except AssertionError as err:
        raise ValueError(
            f"{name} must have shape {tuple(shape)}, got {tuple(jnp.shape(x))}"
        ) from err


def as_float(x: Array) -> Array:
    """``x`` as a floating array (float32 unless it already is floating)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def check_group_size(name: str, group_size: int, minimum: int = 2) -> None:
    """Group-baseline estimators need at least ``minimum`` rollouts per prompt."""
    if group_size < minimum:
        raise ValueError(
            f"{name} needs a group size G >= {minimum}, got G={group_size} "
            "(a group baseline of a single rollout makes every advantage zero)"
        )


# --------------------------------------------------------------------- group layout
def group_ids(num_prompts: int, group_size: int) -> Array:
    """Prompt-major group ids ``[B]``: row ``b`` belongs to prompt ``b // G``."""
    if num_prompts < 1 or group_size < 1:
        raise ValueError(
            f"num_prompts and group_size must be >= 1, got {num_prompts}, {group_size}"
        )
    return jnp.arange(num_prompts * group_size, dtype=jnp.int32) // group_size


def to_groups(x: Array, *, group_size: int) -> Array:
    """Prompt-major flat rows ``[B, ...]`` -> ``[P, G, ...]`` (a reshape)."""
    x = jnp.asarray(x)
    if x.ndim < 1 or group_size < 1 or x.shape[0] % group_size:
        raise ValueError(
            f"x rows ({tuple(x.shape)}) must be a multiple of group_size={group_size}"
        )
    return x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])


def from_groups(x: Array) -> Array:
    """``[P, G, ...]`` -> prompt-major flat rows ``[B, ...]`` (a reshape)."""
    x = jnp.asarray(x)
    check_rank("x", x, list(range(2, max(x.ndim, 2) + 1)))
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


@struct.dataclass
class GroupedRows:
    """Rows of arbitrary order scattered into group form.

    values: ``[P, G]`` with NaN in empty slots (ragged groups).
    slot: ``[B]`` flat index ``p * G + rank`` of each row, or ``P * G`` when the row did
      not fit (its group had more than G members); :func:`gather_from_groups` maps such
      rows to ``fill``.
    """

    values: Array
    slot: Array


def scatter_to_groups(
    x: Array, group_ids: Array, *, num_groups: int, group_size: int
) -> GroupedRows:
    """Scatter flat rows ``x [B]`` with any-order ``group_ids [B]`` into ``[P, G]``.

    Within a group, rows keep their order of appearance (stable sort by group id).
    Empty slots are NaN, which every estimator treats as a missing sample (zero
    advantage, left out of the group statistics). Rows beyond the first ``group_size``
    members of a group, or with an id outside ``[0, num_groups)``, are dropped.
    """
    x = as_float(x)
    ids = jnp.asarray(group_ids)
    check_rank("x", x, 1)
    check_shape("group_ids", ids, x.shape)
    b = x.shape[0]
    order = jnp.argsort(ids, stable=True)
    sorted_ids = ids[order]
    in_range = (sorted_ids >= 0) & (sorted_ids < num_groups)
    safe_ids = jnp.clip(sorted_ids, 0, num_groups - 1)
    counts = jax.ops.segment_sum(
        in_range.astype(jnp.int32), safe_ids, num_segments=num_groups
    )
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(b) - starts[safe_ids]
    fits = in_range & (rank < group_size)
    slot_sorted = jnp.where(fits, safe_ids * group_size + rank, num_groups * group_size)
    slot = jnp.zeros((b,), jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
    dense = jnp.full((num_groups * group_size,), jnp.nan, x.dtype)
    dense = dense.at[slot].set(x, mode="drop")
    return GroupedRows(values=dense.reshape(num_groups, group_size), slot=slot)


def gather_from_groups(values: Array, slot: Array, *, fill: float = 0.0) -> Array:
    """Inverse of :func:`scatter_to_groups`: ``[P, G]`` -> ``[B]`` via ``slot``."""
    values = jnp.asarray(values)
    check_rank("values", values, 2)
    flat = values.reshape(-1)
    return flat.at[jnp.asarray(slot)].get(mode="fill", fill_value=fill)


def broadcast_to_tokens(adv: Array, mask: Array) -> Array:
    """Sequence advantages ``[B]`` or ``[P, G]`` -> token advantages ``[B, T]``.

    ``out[b, t] = adv[b] * mask[b, t]``: padding tokens get exactly 0.
    """
    adv = as_float(adv)
    mask = jnp.asarray(mask)
    check_rank("mask", mask, 2)
    check_rank("adv", adv, (1, 2))
    flat = adv.reshape(-1)
    if flat.shape[0] != mask.shape[0]:
        raise ValueError(
            f"adv has {flat.shape[0]} rows (shape {tuple(adv.shape)}) but mask has "
            f"{mask.shape[0]} rows (shape {tuple(mask.shape)})"
        )
    return flat[:, None] * mask.astype(flat.dtype)


# ------------------------------------------------------------------ masked moments
@struct.dataclass
class Moments:
    """Masked moments: ``mean``, ``var`` and the (global) ``count`` of valid entries."""

    mean: Array
    var: Array
    count: Array


def _psum(x: Array, axis_name) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def masked_moments(
    x: Array, mask: Array, *, unbiased: bool = False, axis_name=None
) -> Moments:
    """Mean and variance of ``x`` over entries where ``mask`` is nonzero.

    mean = Σ m·x / Σ m;  var = Σ m·(x − mean)² / (Σ m − ddof), ddof = 1 if ``unbiased``.
    Two passes over data shifted by its max (no catastrophic cancellation; a constant
    input gives exactly var = 0). With ``axis_name`` (inside
    ``shard_map``/``pmap``) the sums and the count are ``lax.psum``-reduced, so the
    moments are those of the global batch, whatever its split across devices.
    Entries outside the mask may hold anything (NaN included). An empty mask gives
    mean 0 and var 0 instead of NaN.
    """
    x = as_float(x)
    m = jnp.broadcast_to(jnp.asarray(mask), x.shape).astype(bool)
    w = m.astype(x.dtype)
    count = _psum(jnp.sum(w), axis_name)
    # shift by the (global) max so that constant inputs give exactly mean = x, var = 0
    shift = jnp.max(jnp.where(m, x, -jnp.inf))
    if axis_name is not None:
        shift = jax.lax.pmax(shift, axis_name)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    xs = jnp.where(m, x - shift, 0.0)
    mean_s = _psum(jnp.sum(xs), axis_name) / jnp.maximum(count, 1.0)
    dev = jnp.where(m, xs - mean_s, 0.0)
    mean = shift + mean_s
    ddof = 1.0 if unbiased else 0.0
    var = _psum(jnp.sum(dev * dev), axis_name) / jnp.maximum(count - ddof, 1.0)
    return Moments(mean=mean, var=var, count=count)


def whiten(
    x: Array,
    mask: Array,
    *,
    eps: float = 1e-8,
    unbiased: bool = False,
    shift_mean: bool = True,
    axis_name=None,
) -> Array:
    """Masked whitening: ``(x − mean) / sqrt(max(var, eps))`` over valid entries.

    The variance is clamped at ``eps`` (OpenRLHF's REINFORCE++ convention, σ ≥ 1e-4 at
    the default), biased by default (``unbiased=True`` divides by count − 1, as verl's
    ``masked_whiten``). With ``shift_mean=False`` the mean is added back (scale only).
    Masked-out entries are returned as exactly 0. With ``axis_name`` the statistics are
    global under data parallelism (see :func:`masked_moments`).
    """
    x = as_float(x)
    mom = masked_moments(x, mask, unbiased=unbiased, axis_name=axis_name)
    out = (x - mom.mean) * jax.lax.rsqrt(jnp.maximum(mom.var, eps))
    if not shift_mean:
        out = out + mom.mean
    m = jnp.broadcast_to(jnp.asarray(mask), x.shape).astype(bool)
    return jnp.where(m, out, 0.0)
