"""Tests for rlx.objectives.masks: DAPO filter, D³S down-sampling, token masks."""

import itertools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.objectives import masks

SETTINGS = settings(max_examples=15, deadline=None)
# traced k: one compilation per shape instead of one per (shape, k)
_mvs_jit = jax.jit(masks.max_variance_subset_mask, static_argnames="per_group")


def np_best_subset_variance(a, k):
    """Brute force: the largest population variance over all size-k subsets."""
    return max(np.var(np.asarray(s, np.float64)) for s in itertools.combinations(a, k))


def np_keep_count(ratio, n):
    """ceil(ratio · n), where a product within 1e-6 relative above an integer is it."""
    x = float(np.float32(ratio)) * n
    c = math.ceil(x)
    return c - 1 if c - 1 >= x * (1 - 1e-6) else c


def np_top_fraction(score, valid, ratio):
    """Reference: ceil(ratio · n_valid) top scores, ties to the lower flat index."""
    flat = np.where(valid, score, -np.inf).reshape(-1)
    n_keep = np_keep_count(ratio, valid.sum())
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
    keep = np.zeros(flat.size, bool)
    keep[order[:n_keep]] = True
    return (keep & valid.reshape(-1)).reshape(score.shape)


# -------------------------------------------------------------- zero-variance filter
def test_zero_variance_group_mask_by_hand():
    r = jnp.array([[1.0, 1.0], [0.0, 1.0], [jnp.nan, 1.0], [2.0, 2.001]])
    np.testing.assert_array_equal(masks.zero_variance_group_mask(r),
                                  [False, True, False, True])
    np.testing.assert_array_equal(masks.zero_variance_group_mask(r, atol=0.01),
                                  [False, True, False, False])
    with pytest.raises(ValueError, match="atol"):
        masks.zero_variance_group_mask(r, atol=-1.0)
    with pytest.raises(ValueError, match="rewards"):
        masks.zero_variance_group_mask(jnp.ones((4,)))


# ------------------------------------------------------------ D³S sample selection
def test_max_variance_subset_by_hand():
    a = jnp.array([[0.1, 2.0, 3.0, -1.0, 0.5]])
    # {2, 3, −1}: var 2.889 beats {3, −1, 0.1}: 2.847
    np.testing.assert_array_equal(masks.max_variance_subset_mask(a, k=3),
                                  [[False, True, True, True, False]])
    np.testing.assert_array_equal(masks.max_variance_subset_mask(a[0], k=2),
                                  [False, False, True, True, False])
    np.testing.assert_array_equal(masks.max_variance_subset_mask(a, k=0), np.zeros((1, 5)))
    np.testing.assert_array_equal(masks.max_variance_subset_mask(a, k=5), np.ones((1, 5)))


@SETTINGS
@given(st.sampled_from([(1, 4), (2, 6), (1, 8)]), st.data())
def test_max_variance_subset_beats_every_subset_of_the_same_size(shape, data):
    a = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-4, 4, width=32)))
    k = data.draw(st.integers(1, shape[1]))
    sel = np.asarray(_mvs_jit(a, k=k))
    assert sel.shape == a.shape and sel.dtype == bool
    for row in range(shape[0]):
        assert sel[row].sum() == k
        got = np.var(a[row][sel[row]].astype(np.float64))
        best = np_best_subset_variance(a[row], k)
        assert got >= best - 1e-4 * max(best, 1.0)


@SETTINGS
@given(hnp.arrays(np.float32, (2, 3), elements=st.floats(-4, 4, width=32)),
       st.integers(1, 6))
def test_cross_group_selection_is_over_the_whole_batch(a, k):
    sel = np.asarray(_mvs_jit(a, k=k, per_group=False))
    assert sel.sum() == k
    got = np.var(a[sel].astype(np.float64))
    best = np_best_subset_variance(a.reshape(-1), k)
    assert got >= best - 1e-4 * max(best, 1.0)


def test_traced_k_matches_static_k_under_jit():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    fn = jax.jit(lambda x, k: masks.max_variance_subset_mask(x, k=k))
    for k in (1, 3, 6):
        np.testing.assert_array_equal(fn(a, k), masks.max_variance_subset_mask(a, k=k))


def test_max_variance_subset_rejects_bad_k_and_treats_nan_as_zero():
    a = jnp.array([[1.0, jnp.nan, -1.0, 0.2]])
    with pytest.raises(ValueError, match="k must satisfy"):
        masks.max_variance_subset_mask(a, k=5)
    with pytest.raises(ValueError, match="advantages"):
        masks.max_variance_subset_mask(jnp.ones((2, 2, 2)), k=1)
    sel = masks.max_variance_subset_mask(a, k=3)
    np.testing.assert_array_equal(sel, [[True, False, True, True]])  # {1, −1, 0.2}


# ------------------------------------------------------------- D³S token selection
def test_top_score_token_mask_by_hand():
    adv = jnp.array([[1.0, -2.0, 0.5], [0.1, 3.0, -1.0]])
    ent = jnp.array([[1.0, 1.0, 4.0], [1.0, 0.1, 5.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    # scores: 1, 2, 2 | 0.1, 0.3, (5, masked); keep ceil(0.4 · 5) = 2 -> the two 2's
    out = masks.top_score_token_mask(adv, ent, mask, keep_ratio=0.4)
    np.testing.assert_array_equal(out, [[False, True, True], [False, False, False]])
    # sequence advantages broadcast over tokens
    seq = jnp.array([2.0, -1.0])
    np.testing.assert_array_equal(
        masks.top_score_token_mask(seq, ent, mask, keep_ratio=0.4),
        masks.top_score_token_mask(jnp.broadcast_to(seq[:, None], (2, 3)), ent, mask,
                                   keep_ratio=0.4))


@SETTINGS
@given(st.sampled_from([(2, 5), (3, 4)]),
       st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.1, 0.2, 0.3, 0.7, 1e-7])),
       st.data())
def test_top_score_token_mask_matches_reference_ranking(shape, ratio, data):
    adv = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-3, 3, width=32)))
    ent = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 3, width=32)))
    valid = data.draw(hnp.arrays(bool, shape))
    out = np.asarray(masks.top_score_token_mask(adv, ent, valid, keep_ratio=ratio))
    # XLA on CPU flushes subnormal floats to zero; do the same in the reference.
    ftz = lambda x: np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)  # noqa: E731
    score = ftz(np.abs(ftz(adv)) * ftz(ent))
    np.testing.assert_array_equal(out, np_top_fraction(score, valid, ratio))
    assert not np.any(out & ~valid)
    assert out.sum() == np_keep_count(ratio, valid.sum())


def test_top_score_token_mask_rejects_bad_input():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="keep_ratio"):
        masks.top_score_token_mask(x, x, x, keep_ratio=1.5)
    with pytest.raises(ValueError, match="entropy"):
        masks.top_score_token_mask(x, jnp.ones((2, 4)), x, keep_ratio=0.5)
    with pytest.raises(ValueError, match="sequences"):
        masks.top_score_token_mask(jnp.ones((3,)), x, x, keep_ratio=0.5)


# ---------------------------------------------------------------------- schedule
def test_d3s_schedule_interpolates_linearly():
    kw = dict(n_init=2, n_final=8, k_init=0.1, k_final=0.5)
    b0, b_half, b1 = (masks.d3s_schedule(p, **kw) for p in (0.0, 0.5, 1.0))
    assert (b0.num_samples, b_half.num_samples, b1.num_samples) == (2, 5, 8)
    np.testing.assert_allclose([b0.keep_ratio, b_half.keep_ratio, b1.keep_ratio],
                               [0.1, 0.3, 0.5])
    assert masks.d3s_schedule(7.0, **kw).num_samples == 8  # progress is clipped
    traced = jax.jit(lambda p: masks.d3s_schedule(p, **kw))(jnp.float32(0.5))
    assert int(traced.num_samples) == 5
    np.testing.assert_allclose(traced.keep_ratio, 0.3, rtol=1e-6)
    with pytest.raises(ValueError, match="k_init"):
        masks.d3s_schedule(0.5, n_init=2, n_final=8, k_init=2.0, k_final=0.5)


def test_d3s_end_to_end_under_jit_with_traced_budget():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    ent = jnp.asarray(rng.random((12, 5)), jnp.float32)
    tok_mask = jnp.ones((12, 5))

    @jax.jit
    def select(progress):
        budget = masks.d3s_schedule(progress, n_init=2, n_final=6, k_init=0.2,
                                    k_final=1.0)
        keep = masks.max_variance_subset_mask(a, k=budget.num_samples)
        live = tok_mask * keep.reshape(-1, 1)
        return keep, masks.top_score_token_mask(a, ent, live, keep_ratio=budget.keep_ratio)

    keep, tokens = select(jnp.float32(0.0))
    assert int(keep.sum()) == 4 and int(tokens.sum()) == math.ceil(0.2 * 4 * 5)
    assert not np.any(np.asarray(tokens) & ~np.asarray(keep).reshape(-1, 1))
    keep, tokens = select(jnp.float32(1.0))
    assert int(keep.sum()) == 12 and int(tokens.sum()) == 60


# ---------------------------------------------------------------- token masks
def test_high_entropy_token_mask_by_hand_and_threshold_property():
    ent = jnp.array([[0.1, 2.0, 0.3, 0.0, 5.0], [1.0, 0.2, 0.4, 3.0, 9.0]])
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    out = np.asarray(masks.high_entropy_token_mask(ent, mask))  # ceil(0.2 · 9) = 2
    np.testing.assert_array_equal(out, [[0, 0, 0, 0, 1], [0, 0, 0, 1, 0]])
    out = np.asarray(masks.high_entropy_token_mask(ent, mask, top_quantile=0.5))
    valid = np.asarray(mask, bool)
    e = np.asarray(ent)
    assert out.sum() == 5
    assert e[out].min() >= e[valid & ~out].max()
    with pytest.raises(ValueError, match="top_quantile"):
        masks.high_entropy_token_mask(ent, mask, top_quantile=-0.1)


def test_truncated_and_forced_prefix_masks_by_hand():
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(
        masks.truncated_completion_mask(jnp.array([True, False]), mask),
        [[True, True, False], [False, False, False]])
    forced = jnp.array([[1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(masks.forced_prefix_mask(forced, mask),
                                  [[False, True, False], [False, False, True]])
    with pytest.raises(ValueError, match="finished"):
        masks.truncated_completion_mask(jnp.array([True]), mask)
    with pytest.raises(ValueError, match="forced"):
        masks.forced_prefix_mask(jnp.ones((2, 2)), mask)
