import functools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlx.objectives.aggregation import (
    masked_mean, safe_div, seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm,
    token_mean,
)

L = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
M = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)

NORM = 4.0
MODES = {
    "token_mean": token_mean,
    "seq_mean_token_sum": seq_mean_token_sum,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": functools.partial(seq_mean_token_sum_norm, norm_constant=NORM),
}


def np_reference(mode, loss, mask):
    """float64 transcription of formulas.md's aggregation definitions (rows with a
    valid token count as sequences)."""
    loss, mask = np.asarray(loss, np.float64), np.asarray(mask, np.float64)
    rows = [i for i in range(loss.shape[0]) if mask[i].sum() > 0]
    if not rows:
        return 0.0
    if mode == "token_mean":
        return (loss * mask).sum() / mask.sum()
    per = []
    for i in rows:
        s = (loss[i] * mask[i]).sum()
        per.append({"seq_mean_token_sum": s, "seq_mean_token_mean": s / mask[i].sum(),
                    "seq_mean_token_sum_norm": s / NORM}[mode])
    return float(np.mean(per))


def test_hand_computed_values():
    # valid tokens: row0 {1,2}, row1 {4}; row2 fully masked (not a sequence)
    assert float(safe_div(*token_mean(jnp.asarray(L), M))) == pytest.approx(7 / 3)
    assert float(safe_div(*seq_mean_token_sum(jnp.asarray(L), M))) == pytest.approx((3 + 4) / 2)
    assert float(safe_div(*seq_mean_token_mean(jnp.asarray(L), M))) == pytest.approx((1.5 + 4) / 2)
    num, den = seq_mean_token_sum_norm(jnp.asarray(L), M, norm_constant=4.0)
    assert float(den) == 2 and float(num / den) == pytest.approx((3 + 4) / 4 / 2)


@pytest.mark.parametrize("mode", list(MODES))
def test_matches_numpy_reference_on_random_inputs(mode):
    rng = np.random.default_rng(1)
    loss = rng.normal(size=(6, 7)).astype(np.float32)
    mask = (rng.random((6, 7)) < 0.6).astype(np.float32)
    got = float(safe_div(*MODES[mode](jnp.asarray(loss), jnp.asarray(mask))))
    assert got == pytest.approx(np_reference(mode, loss, mask), rel=1e-5, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 8), t=st.integers(1, 6),
       mode=st.sampled_from(sorted(MODES)), data=st.data())
def test_invariant_under_batch_splitting(seed, b, t, mode, data):
    rng = np.random.default_rng(seed)
    loss = rng.normal(size=(b, t)).astype(np.float32)
    mask = (rng.random((b, t)) < 0.5).astype(np.float32)
    cuts = sorted(data.draw(st.lists(st.integers(1, max(b - 1, 1)), max_size=3, unique=True)))
    cuts = [c for c in cuts if 0 < c < b]
    fn = MODES[mode]
    full = float(safe_div(*fn(jnp.asarray(loss), jnp.asarray(mask))))
    nums, dens = zip(*(fn(jnp.asarray(lp), jnp.asarray(mp))
                       for lp, mp in zip(np.split(loss, cuts), np.split(mask, cuts))))
    split = float(safe_div(sum(nums), sum(dens)))
    assert split == pytest.approx(full, rel=1e-5, abs=1e-6)
    assert full == pytest.approx(np_reference(mode, loss, mask), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_all_masked_batch_gives_zero_not_nan(mode):
    loss = jnp.full((2, 3), jnp.nan)  # garbage under the mask must not leak
    num, den = MODES[mode](loss, jnp.zeros((2, 3)))
    assert float(num) == 0.0 and float(den) == 0.0
    assert float(safe_div(num, den)) == 0.0


def test_masked_positions_with_inf_do_not_leak():
    loss = jnp.asarray([[1.0, jnp.inf], [2.0, -jnp.nan]])
    mask = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])
    for fn in MODES.values():
        assert np.isfinite(float(safe_div(*fn(loss, mask))))
    assert float(masked_mean(loss, mask)) == pytest.approx(1.5)


def test_norm_constant_must_be_positive():
    with pytest.raises(ValueError, match="norm_constant"):
        seq_mean_token_sum_norm(jnp.ones((1, 1)), jnp.ones((1, 1)), norm_constant=0)
