"""Sample and token selection masks: DAPO filter, D³S down-sampling, entropy masks.

Each function returns a boolean mask with a static shape; multiply (or ``&``) it into
the loss mask. Sample masks are ``[P]``, ``[P, G]`` or ``[N]``; token masks ``[B, T]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from rlx.objectives.groups import as_float, check_rank, check_shape

Array = jax.Array


def zero_variance_group_mask(rewards: Array, *, atol: float = 0.0) -> Array:
    """DAPO dynamic-sampling filter (arXiv 2503.14476): keep groups that can teach.

    keep_p = (max_g r_pg − min_g r_pg) > atol over the group's finite rewards; a group
    with fewer than 2 finite rewards is dropped. rewards: [P, G] -> bool [P].
    (For binary rewards this is 0 < #correct < G.)
    """
    r = as_float(rewards)
    check_rank("rewards", r, 2)
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    valid = jnp.isfinite(r)
    hi = jnp.max(jnp.where(valid, r, -jnp.inf), axis=-1)
    lo = jnp.min(jnp.where(valid, r, jnp.inf), axis=-1)
    enough = jnp.sum(valid, axis=-1) >= 2
    return enough & ((hi - lo) > atol)


def _max_variance_rows(a: Array, k) -> Array:
    """Rows of ``a [R, n]``: bool mask of a size-k subset of maximal variance.

    PODS lemma (arXiv 2504.13818): some optimal subset is the j largest plus the k − j
    smallest values. Sort once, evaluate every j with prefix sums of a and a².
    """
    r, n = a.shape
    order = jnp.argsort(a, axis=-1, stable=True)
    s = jnp.take_along_axis(a, order, axis=-1)
    zero = jnp.zeros((r, 1), a.dtype)
    c1 = jnp.concatenate([zero, jnp.cumsum(s, axis=-1)], axis=-1)  # [R, n+1]
    c2 = jnp.concatenate([zero, jnp.cumsum(s * s, axis=-1)], axis=-1)
    k = jnp.asarray(k, jnp.int32)
    j = jnp.arange(n + 1)  # number of top elements taken
    bottom = jnp.clip(k - j, 0, n)
    feasible = (j <= k) & (k - j <= n - j)
    top_start = n - j

    def take(c, idx):
        return jnp.take_along_axis(c, jnp.broadcast_to(idx, (r, n + 1)), axis=-1)

    s1 = take(c1, bottom) + c1[:, -1:] - take(c1, top_start)
    s2 = take(c2, bottom) + c2[:, -1:] - take(c2, top_start)
    kf = jnp.maximum(k, 1).astype(a.dtype)
    var = s2 / kf - (s1 / kf) ** 2
    var = jnp.where(feasible[None, :], var, -jnp.inf)
    best = jnp.argmax(var, axis=-1)[:, None]  # [R, 1]
    pos = jnp.arange(n)[None, :]
    chosen_sorted = (pos < k - best) | (pos >= n - best)
    chosen_sorted = chosen_sorted & (k > 0)
    out = jnp.zeros((r, n), bool)
    return out.at[jnp.arange(r)[:, None], order].set(chosen_sorted)


def max_variance_subset_mask(advantages: Array, *, k, per_group: bool = True) -> Array:
    """D³S sample-level down-sampling (arXiv 2509.22115, §5; PODS arXiv 2504.13818).

    Select S with |S| = k maximising Var(A_S) (population variance); the selection is
    top-j ∪ bottom-(k−j) of the sorted advantages for the best j, found in O(n log n)
    with prefix sums, static shapes. advantages: [P, G] or [N]. ``per_group=True`` picks
    k of G in each row of a [P, G] input; ``per_group=False`` picks k of all P·G (the
    cross-group variant D³S uses) or of the N entries of a 1-D input. ``k`` may be a
    Python int (checked: 0 ≤ k ≤ n) or a traced int (then clipped to [0, n]). Advantages
    are not renormalised after selection. Non-finite advantages are treated as 0.
    Ties in variance go to the smallest j. Returns a bool mask shaped like the input
    with exactly k True per selection set.
    """
    a = as_float(advantages)
    check_rank("advantages", a, (1, 2))
    a = jnp.where(jnp.isfinite(a), a, 0.0)
    rows = a.reshape(a.shape[0], -1) if (a.ndim == 2 and per_group) else a.reshape(1, -1)
    n = rows.shape[1]
    if isinstance(k, (int,)) and not 0 <= k <= n:
        raise ValueError(f"k must satisfy 0 <= k <= {n} (selection set size), got k={k}")
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, n)
    return _max_variance_rows(rows, k).reshape(a.shape)


def _top_fraction_mask(score: Array, valid: Array, ratio) -> Array:
    """Keep the ceil(ratio · n_valid) highest-scoring valid entries (ties: lower index).

    A product within 1e-6 (relative) above an integer counts as that integer.
    """
    flat = jnp.where(valid, score, -jnp.inf).reshape(-1)
    v = valid.reshape(-1)
    n_valid = jnp.sum(v)
    x = jnp.asarray(ratio, jnp.float32) * n_valid
    # ceil(x), except that float32 round-off just above an integer (0.2f · 10 =
    # 2.0000000298) must not add a token: within 1e-6 relative, round down
    c = jnp.ceil(x)
    n_keep = jnp.where(c - 1.0 >= x * (1.0 - 1e-6), c - 1.0, c).astype(jnp.int32)
    order = jnp.argsort(-flat, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    return ((rank < n_keep) & v).reshape(score.shape)


def _check_ratio(name: str, ratio) -> None:
    if isinstance(ratio, (int, float)) and not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {ratio}")


def top_score_token_mask(
    advantages: Array, entropy: Array, mask: Array, *, keep_ratio
) -> Array:
    """D³S token-level selection (arXiv 2509.22115, §5): keep tokens with top |A|·H.

    score_{b,t} = |A_{b,t}|·H_{b,t}; keep the ceil(keep_ratio · n_valid) highest-scoring
    valid tokens, ranked over the whole (local) batch, not per sequence. advantages:
    [B, T] (any array shaped like ``mask`` is read as per-token), or [B] / [P, G]
    sequence advantages (broadcast over tokens); entropy, mask:
    [B, T]. keep_ratio in [0, 1], may be traced (e.g. from :func:`d3s_schedule`).
    Ties are broken towards lower flat index. Returns bool [B, T].
    Reading: ranking is per device batch; under data parallelism it is not global.
    """
    mask = jnp.asarray(mask)
    check_rank("mask", mask, 2)
    ent = as_float(entropy)
    check_shape("entropy", ent, mask.shape)
    adv = as_float(advantages)
    if adv.shape != mask.shape:
        check_rank("advantages", adv, (1, 2))
        adv = adv.reshape(-1)
        if adv.shape[0] != mask.shape[0]:
            raise ValueError(
                f"advantages has {adv.shape[0]} sequences but mask has {mask.shape[0]}"
            )
        adv = adv[:, None]
    _check_ratio("keep_ratio", keep_ratio)
    score = jnp.abs(adv) * ent
    valid = mask.astype(bool) & jnp.isfinite(score)
    return _top_fraction_mask(score, valid, keep_ratio)


@struct.dataclass
class D3SBudget:
    """D³S budget at a training progress: samples kept and token keep-ratio."""

    num_samples: Array | int
    keep_ratio: Array | float


def d3s_schedule(progress, *, n_init: int, n_final: int, k_init: float, k_final: float
                 ) -> D3SBudget:
    """D³S linear schedule: [N_s, K](p) = (1 − p)·[N_init, K_init] + p·[N_final, K_final].

    progress p in [0, 1] (clipped). N_s is rounded to the nearest int. A Python float
    ``progress`` gives Python numbers (so N_s can be a static ``k``); a traced one gives
    arrays (use the traced ``k`` path of :func:`max_variance_subset_mask`).
    """
    _check_ratio("k_init", k_init)
    _check_ratio("k_final", k_final)
    if n_init < 0 or n_final < 0:
        raise ValueError(f"n_init and n_final must be >= 0, got {n_init}, {n_final}")
    if isinstance(progress, (int, float)):
        p = min(max(float(progress), 0.0), 1.0)
        n = (1.0 - p) * n_init + p * n_final
        return D3SBudget(num_samples=int(math.floor(n + 0.5)),
                         keep_ratio=(1.0 - p) * k_init + p * k_final)
    p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    n = (1.0 - p) * n_init + p * n_final
    return D3SBudget(num_samples=jnp.floor(n + 0.5).astype(jnp.int32),
                     keep_ratio=(1.0 - p) * k_init + p * k_final)


def high_entropy_token_mask(entropy: Array, mask: Array, *, top_quantile: float = 0.2
                            ) -> Array:
    """Keep the highest-entropy ``top_quantile`` of valid tokens ("forking tokens").

    Wang et al., "Beyond the 80/20 Rule", arXiv 2506.01939: policy gradient only on the
    top 20% entropy tokens of the batch. Keeps ceil(q · n_valid) tokens ranked over the
    batch (ties towards lower flat index). entropy, mask: [B, T] -> bool [B, T].
    """
    mask = jnp.asarray(mask)
    check_rank("mask", mask, 2)
    ent = as_float(entropy)
    check_shape("entropy", ent, mask.shape)
    _check_ratio("top_quantile", top_quantile)
    valid = mask.astype(bool) & jnp.isfinite(ent)
    return _top_fraction_mask(ent, valid, top_quantile)


def truncated_completion_mask(finished: Array, mask: Array) -> Array:
    """DAPO overlong filtering: drop every token of completions that hit the length cap.

    out_{b,t} = mask_{b,t} ∧ finished_b. finished: [B] bool (True = ended with EOS),
    mask: [B, T] -> bool [B, T].
    """
    mask = jnp.asarray(mask)
    check_rank("mask", mask, 2)
    fin = jnp.asarray(finished)
    check_shape("finished", fin, (mask.shape[0],))
    return mask.astype(bool) & fin.astype(bool)[:, None]


def forced_prefix_mask(forced: Array, mask: Array) -> Array:
    """Drop tokens the policy did not sample (forced/teacher prefix, tool output).

    out = mask ∧ ¬forced. forced, mask: [B, T] -> bool [B, T].
    """
    mask = jnp.asarray(mask)
    check_rank("mask", mask, 2)
    f = jnp.asarray(forced)
    check_shape("forced", f, mask.shape)
    return mask.astype(bool) & ~f.astype(bool)
