"""Tests for rlx.objectives.shaping: overlong penalty, repetition detectors, adaptive weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.objectives import shaping

SETTINGS = settings(max_examples=20, deadline=None)
# jitted once for the property tests (eager fori_loop/lexsort re-trace on every call)
_loop_jit = jax.jit(shaping.repetition_loop_fraction)
_ngram_jit = jax.jit(shaping.ngram_repetition_penalty, static_argnames="n")


# ------------------------------------------------------------ NumPy transcriptions
def np_overlong(lengths, max_length, buffer, factor=1.0):
    out = []
    for n in lengths:
        exp = max_length - buffer
        if n <= exp:
            out.append(0.0)
        elif n <= max_length:
            out.append((exp - n) / buffer * factor)
        else:
            out.append(-factor)
    return np.array(out)


def np_ngram_fraction(tokens, mask, n):
    out = []
    for row, m in zip(tokens, mask):
        seq = [int(t) for t, v in zip(row, m) if v]
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        seen, rep = set(), 0
        for g in grams:
            rep += g in seen
            seen.add(g)
        out.append(rep / len(grams) if grams else 0.0)
    return np.array(out)


def np_loop_fraction(seq):
    """Plain-Python transcription of CAMPO's find_infinite_loop_start (min_repeats=2)."""
    n = len(seq)
    found, start = False, n
    for length in range(1, n // 2 + 1):
        count, right = 1, n - length
        while right - length >= 0:
            if seq[right - length:right] != seq[right:right + length]:
                break
            count += 1
            right -= length
        if count >= 2:
            found, start = True, right
    return (n - start) / n if found else 0.0


# ------------------------------------------------------------------ overlong penalty
def test_overlong_penalty_by_hand():
    lengths = jnp.array([10, 16, 17, 18, 20, 21])
    np.testing.assert_allclose(
        shaping.overlong_penalty(lengths, max_length=20, buffer=4),
        [0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    np.testing.assert_allclose(
        shaping.overlong_penalty(lengths, max_length=20, buffer=4, factor=2.0),
        [0.0, 0.0, -0.5, -1.0, -2.0, -2.0])


def test_overlong_penalty_matches_numpy_and_validates():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=30)
    np.testing.assert_allclose(
        shaping.overlong_penalty(jnp.asarray(lengths), max_length=32, buffer=10,
                                 factor=0.5),
        np_overlong(lengths, 32, 10, 0.5), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="buffer"):
        shaping.overlong_penalty(lengths, max_length=8, buffer=0)
    with pytest.raises(ValueError, match="buffer"):
        shaping.overlong_penalty(lengths, max_length=8, buffer=9)
    with pytest.raises(ValueError, match="lengths"):
        shaping.overlong_penalty(jnp.ones((2, 2)), max_length=8, buffer=2)


# ------------------------------------------------------------ n-gram repetition
def test_ngram_repetition_by_hand():
    toks = jnp.array([[1, 2, 3, 1, 2, 3, 1, 2, 3, 0], [5, 6, 7, 8, 9, 1, 2, 3, 4, 4]])
    ones = jnp.ones_like(toks)
    # row 0: 8 trigrams, 123 ×3, 231 ×2, 312 ×2, 230 -> 4 repeats
    np.testing.assert_allclose(shaping.ngram_repetition_penalty(toks, ones, n=3),
                               [0.5, 0.0])
    # bigrams of row 1: ..., (3,4), (4,4): no repeat; unigrams: the second 4 repeats
    np.testing.assert_allclose(shaping.ngram_repetition_penalty(toks, ones, n=1)[1], 0.1)
    # padding is ignored: only the first 3 tokens of row 0 are valid -> one trigram
    mask = jnp.array([[1, 1, 1] + [0] * 7, [1] * 10])
    np.testing.assert_allclose(shaping.ngram_repetition_penalty(toks, mask, n=3), [0, 0])
    # fewer valid tokens than n, or T < n
    np.testing.assert_array_equal(
        shaping.ngram_repetition_penalty(toks, mask * 0, n=3), [0.0, 0.0])
    np.testing.assert_array_equal(
        shaping.ngram_repetition_penalty(toks[:, :2], ones[:, :2], n=3), [0.0, 0.0])
    with pytest.raises(ValueError, match="n must be"):
        shaping.ngram_repetition_penalty(toks, ones, n=0)
    with pytest.raises(ValueError, match="mask"):
        shaping.ngram_repetition_penalty(toks, ones[:, :3], n=2)


@SETTINGS
@given(st.integers(1, 4), st.data())
def test_ngram_repetition_matches_python_reference(n, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    toks = rng.integers(0, 3, size=(3, 12))
    mask = rng.random((3, 12)) < 0.8  # holes allowed: valid tokens are taken in order
    out = _ngram_jit(jnp.asarray(toks), jnp.asarray(mask), n=n)
    np.testing.assert_allclose(out, np_ngram_fraction(toks, mask, n), rtol=1e-6)


# ------------------------------------------------------------------ loop detector
def test_repetition_loop_fraction_by_hand():
    toks = jnp.array([
        [1, 2, 3, 1, 2, 3, 1, 2, 3, 0],  # no terminal loop (ends in a unique 0)
        [5, 6, 7, 8, 9, 1, 2, 3, 4, 4],  # "4 4": loop of length 1 from index 8 -> 0.2
        [9, 8, 1, 2, 1, 2, 1, 2, 1, 2],  # "12" × 4 from index 2 -> 0.8
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # whole sequence; the largest ℓ=5 wins -> 1.0
    ])
    out = shaping.repetition_loop_fraction(toks, jnp.ones_like(toks))
    np.testing.assert_allclose(out, [0.0, 0.2, 0.8, 1.0], rtol=1e-6)
    for row, expected in zip(np.asarray(toks), out):
        assert np_loop_fraction(list(row)) == pytest.approx(float(expected))
    # right padding: row 2 with its last 2 tokens masked is 9 8 1 2 1 2 1 2 -> 6/8
    mask = jnp.ones_like(toks).at[2, 8:].set(0)
    np.testing.assert_allclose(shaping.repetition_loop_fraction(toks, mask)[2], 0.75)
    np.testing.assert_array_equal(
        shaping.repetition_loop_fraction(toks, jnp.zeros_like(toks)), np.zeros(4))


@SETTINGS
@given(st.data())
def test_repetition_loop_fraction_matches_python_transcription(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    rows, masks_ = [], []
    for _ in range(4):
        prefix = list(rng.integers(0, 4, size=rng.integers(0, 6)))
        phrase = list(rng.integers(0, 3, size=rng.integers(1, 4)))
        seq = (prefix + phrase * int(rng.integers(1, 5)))[:14]
        n = len(seq)
        rows.append(seq + [7] * (14 - n))
        masks_.append([1] * n + [0] * (14 - n))
    out = _loop_jit(jnp.array(rows), jnp.array(masks_))
    expected = [np_loop_fraction(r[:sum(m)]) if sum(m) else 0.0
                for r, m in zip(rows, masks_)]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_repetition_detectors_are_jittable():
    toks = jnp.array([[1, 2, 1, 2, 1, 2], [3, 4, 5, 6, 7, 8]])
    mask = jnp.ones_like(toks)
    f = jax.jit(lambda t, m: (shaping.repetition_loop_fraction(t, m),
                              shaping.ngram_repetition_penalty(t, m, n=2)))
    loop, ngram = f(toks, mask)
    np.testing.assert_allclose(loop, [1.0, 0.0])
    np.testing.assert_allclose(ngram, [0.6, 0.0])  # 12 21 12 21 12 -> 3 of 5 repeat


# -------------------------------------------------------------- adaptive weight
def test_repetition_weight_rises_above_target_and_decays_to_zero_below():
    s = shaping.repetition_weight_init(weight=0.1, target=0.05, lr=1.0, max_weight=0.3)
    s = shaping.repetition_weight_update(s, jnp.float32(0.15))
    np.testing.assert_allclose(s.weight, 0.2, rtol=1e-6)
    s = shaping.repetition_weight_update(s, jnp.float32(0.5))
    np.testing.assert_allclose(s.weight, 0.3)  # clipped at max_weight
    for _ in range(10):
        s = shaping.repetition_weight_update(s, jnp.float32(0.0))
    np.testing.assert_array_equal(s.weight, 0.0)  # projected at 0
    s2 = shaping.repetition_weight_update(s, jnp.float32(jnp.nan))
    np.testing.assert_array_equal(s2.weight, s.weight)


def test_repetition_weight_state_is_carried_through_jit():
    s = shaping.repetition_weight_init(weight=0.0, target=0.1, lr=0.5)
    step = jax.jit(shaping.repetition_weight_update)
    for rate in (0.3, 0.3):
        s = step(s, jnp.float32(rate))
    np.testing.assert_allclose(s.weight, 0.2, rtol=1e-6)
    assert s.target == 0.1 and s.lr == 0.5
    with pytest.raises(ValueError, match="weight"):
        shaping.repetition_weight_init(weight=-1.0, target=0.1, lr=0.1)
    with pytest.raises(ValueError, match="observed_rate"):
        shaping.repetition_weight_update(s, jnp.ones((2,)))


def test_apply_repetition_penalty_by_hand():
    out = shaping.apply_repetition_penalty(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.2]),
                                           weight=0.4)
    np.testing.assert_allclose(out, [0.8, -0.08], rtol=1e-6)
    with pytest.raises(ValueError, match="fraction"):
        shaping.apply_repetition_penalty(jnp.ones((2,)), jnp.ones((3,)), weight=1.0)
