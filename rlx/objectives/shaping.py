"""In-graph reward shaping on token ids: overlong penalty and repetition penalties.

All functions work on ``tokens [B, T]`` / ``mask [B, T]`` or ``lengths [B]`` with
static shapes, so shaping runs inside the jitted step. They return per-sequence values
``[B]`` to add to (or subtract from) the outcome reward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rlx.objectives.groups import as_float, check_rank, check_shape

Array = jax.Array


def overlong_penalty(
    lengths: Array, *, max_length: int, buffer: int, factor: float = 1.0
) -> Array:
    """DAPO soft overlong punishment (arXiv 2503.14476), lengths in tokens.

    With L_exp = max_length − buffer:
    R_len = 0 if |y| ≤ L_exp;  (L_exp − |y|)/buffer if L_exp < |y| ≤ max_length;
    −1 if |y| > max_length; all times ``factor``. (verl's ramp keeps going below −1 past
    max_length; rlx follows the paper's −1.) lengths: [B] -> [B], to add to the reward.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(
            f"need 0 < buffer <= max_length, got buffer={buffer}, max_length={max_length}"
        )
    ln = as_float(lengths)
    check_rank("lengths", ln, 1)
    expected = max_length - buffer
    ramp = (expected - ln) / buffer
    pen = jnp.where(ln <= expected, 0.0, jnp.where(ln <= max_length, ramp, -1.0))
    return factor * pen


def _compact(tokens: Array, mask: Array):
    """Moves valid tokens to the front (order kept); returns (tokens, valid, n)."""
    m = mask.astype(bool)
    order = jnp.argsort(~m, axis=1, stable=True)
    toks = jnp.take_along_axis(tokens, order, axis=1)
    n = jnp.sum(m, axis=1).astype(jnp.int32)
    valid = jnp.arange(tokens.shape[1])[None, :] < n[:, None]
    return toks, valid, n


def _check_tokens(tokens: Array, mask: Array):
    tokens = jnp.asarray(tokens)
    check_rank("tokens", tokens, 2)
    mask = jnp.asarray(mask)
    check_shape("mask", mask, tokens.shape)
    return tokens, mask


def ngram_repetition_penalty(tokens: Array, mask: Array, *, n: int = 4) -> Array:
    """Fraction of a completion's n-grams that repeat an earlier n-gram of it.

    frac_b = #{valid n-grams equal to an earlier n-gram of row b} / #{valid n-grams},
    exact (lexicographic sort of the n-gram windows, no hashing), O(T log T) per row.
    Valid tokens are the masked ones taken in order (so the mask may have holes); a row
    with fewer than n valid tokens gives 0. tokens: [B, T] int, mask: [B, T] -> [B] in
    [0, 1]. Subtract ``weight · frac`` from the reward (see :func:`repetition_weight_init`).
    """
    tokens, mask = _check_tokens(tokens, mask)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    b, t = tokens.shape
    if t < n:
        return jnp.zeros((b,), jnp.float32)
    toks, valid, _ = _compact(tokens, mask)
    w = t - n + 1
    grams = [toks[:, i:i + w] for i in range(n)]  # n × [B, W]
    win_ok = valid[:, n - 1:n - 1 + w]  # window valid iff its last token is valid
    pos = jnp.broadcast_to(jnp.arange(w), (b, w))
    # lexsort: last key is primary -> invalid windows last, then tokens, then position
    keys = (pos,) + tuple(reversed(grams)) + ((~win_ok).astype(jnp.int32),)
    order = jnp.lexsort(keys, axis=-1)
    s_ok = jnp.take_along_axis(win_ok, order, axis=1)
    same = jnp.ones((b, w - 1), bool)
    for g in grams:
        sg = jnp.take_along_axis(g, order, axis=1)
        same = same & (sg[:, 1:] == sg[:, :-1])
    dup = same & s_ok[:, 1:] & s_ok[:, :-1]
    count = jnp.sum(win_ok, axis=1)
    return jnp.sum(dup, axis=1) / jnp.maximum(count, 1).astype(jnp.float32)


def repetition_loop_fraction(tokens: Array, mask: Array) -> Array:
    """MiroMind-M1 CAMPO terminal-loop detector (arXiv 2507.14683, formulas §7).

    Transcribes the official ``find_infinite_loop_start`` (min_repeats = 2, exact match)
    with static shapes: for each phrase length ℓ = 1..⌊n/2⌋, count how many consecutive
    length-ℓ blocks, walking back from the end, equal their successor; if at least one
    (≥ 2 repeats) the loop starts at n − (m+1)ℓ with m the number of matches. The
    largest such ℓ wins; f = (n − start)/n, or 0 without a loop. n = number of valid
    tokens (taken in order, so the mask may have holes). Equivalently, with
    run_ℓ = length of the suffix on which tok[i] = tok[i−ℓ], m = ⌊run_ℓ/ℓ⌋. O(T²) time,
    O(B·T) memory (``lax.fori_loop`` over ℓ). tokens: [B, T], mask: [B, T] -> [B] in [0, 1].
    Paper Eq. 6 subtracts f from the reward; the released code instead subtracts 0.1
    when the response is truncated and f > 0 — compose either from this value.
    """
    tokens, mask = _check_tokens(tokens, mask)
    b, t = tokens.shape
    toks, valid, n = _compact(tokens, mask)
    idx = jnp.arange(t)[None, :]

    def body(ell, start):
        shifted = jnp.roll(toks, ell, axis=1)
        d = (toks == shifted) & (idx >= ell) & valid
        last_bad = jnp.max(jnp.where(valid & ~d, idx, -1), axis=1)
        run = n - 1 - last_bad
        m = run // ell
        found = (m >= 1) & (2 * ell <= n)
        return jnp.where(found, n - (m + 1) * ell, start)

    init = n + jnp.zeros_like(toks[:, 0], jnp.int32)  # keeps shard_map's varying type
    start = jax.lax.fori_loop(1, t // 2 + 1, body, init)
    return jnp.where(n > 0, (n - start) / jnp.maximum(n, 1), 0.0).astype(jnp.float32)


@struct.dataclass
class RepetitionWeightState:
    """Adaptive repetition-penalty weight (leaf) and its static controller settings."""

    weight: Array
    target: float = struct.field(pytree_node=False, default=0.0)
    lr: float = struct.field(pytree_node=False, default=0.0)
    max_weight: float = struct.field(pytree_node=False, default=float("inf"))


def repetition_weight_init(
    *, weight: float, target: float, lr: float, max_weight: float = float("inf")
) -> RepetitionWeightState:
    """Initial state of the adaptive repetition-penalty weight.

    MiroMind-M1's scripts ask for a "dynamic" repetition penalty but the released code
    does not define it. Reading chosen: treat "observed repetition rate ≤ target" as a
    constraint and the weight as its Lagrange multiplier, updated by projected dual
    ascent (see :func:`repetition_weight_update`).
    """
    if weight < 0 or target < 0 or lr < 0 or max_weight < weight:
        raise ValueError(
            "need weight >= 0, target >= 0, lr >= 0 and max_weight >= weight, got "
            f"weight={weight}, target={target}, lr={lr}, max_weight={max_weight}"
        )
    return RepetitionWeightState(weight=jnp.asarray(weight, jnp.float32),
                                 target=float(target), lr=float(lr),
                                 max_weight=float(max_weight))


def repetition_weight_update(state: RepetitionWeightState, observed_rate
                             ) -> RepetitionWeightState:
    """w ← clip(w + lr·(observed_rate − target), 0, max_weight).

    observed_rate: scalar, e.g. the batch mean of :func:`repetition_loop_fraction` or of
    :func:`ngram_repetition_penalty`. The weight rises while repetition exceeds the
    target and decays to 0 once it is below. A non-finite rate leaves w unchanged.
    """
    rate = as_float(observed_rate)
    check_rank("observed_rate", rate, 0)
    new = jnp.clip(state.weight + state.lr * (rate - state.target), 0.0, state.max_weight)
    return state.replace(weight=jnp.where(jnp.isfinite(rate), new, state.weight)
                         .astype(jnp.float32))


def apply_repetition_penalty(rewards: Array, fraction: Array, *, weight) -> Array:
    """Shaped reward r − w·f (paper Eq. 6 form with weight w). Same shapes in and out."""
    r = as_float(rewards)
    f = as_float(fraction)
    check_shape("fraction", f, r.shape)
    return r - weight * f
