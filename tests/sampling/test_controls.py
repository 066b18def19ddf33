"""Logit processors and the per-row sampler against a float64 NumPy transcription."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rlx.sampling import controls
from rlx.sampling.config import SamplerConfig

# χ² 0.999 quantiles by degrees of freedom: a correct sampler fails with prob 1e-3, and
# the seed is fixed, so the outcome is deterministic.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def reference(z, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, forbidden=()):
    """Processed logits (−inf = excluded) and the top-p / min-p boundary margins."""
    z = np.asarray(z, np.float64).copy()
    z[list(forbidden)] = -np.inf
    z = z / temperature
    margin = np.inf
    if top_k:
        kth = np.sort(z)[::-1][top_k - 1]
        z[z < kth] = -np.inf
    if top_p < 1:
        probs = np.exp(z - np.logaddexp.reduce(z))
        order = np.argsort(-z, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        margin = min(margin, np.min(np.abs(before - top_p)))
        kept = max(1, int(np.sum(before < top_p)))
        z[z < z[order][kept - 1]] = -np.inf
    if min_p:
        cut = np.max(z) + np.log(min_p)
        finite = z[np.isfinite(z)]
        margin = min(margin, np.min(np.abs(finite - cut)))
        z[z < cut] = -np.inf
    return z, margin


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), top_k=st.integers(0, 12),
       top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.6),
       temperature=st.floats(0.3, 2.0), n_forbidden=st.integers(0, 3))
def test_truncation_never_emits_a_token_outside_the_allowed_set(
        seed, top_k, top_p, min_p, temperature, n_forbidden):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(4, 12)) * 2).astype(np.float32)
    forbidden = tuple(int(i) for i in rng.choice(12, n_forbidden, replace=False))
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    refs = [reference(row, forbidden=forbidden, **kw) for row in logits]
    assume(all(m > 1e-4 for _, m in refs))
    want = np.stack([r for r, _ in refs])

    got = np.asarray(controls.process_logits(jnp.asarray(logits), forbidden_ids=forbidden,
                                             **kw))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5)

    n = 256
    keys = jax.random.split(jax.random.key(seed), n * 4)
    tokens, logp = controls.sample(keys, jnp.tile(jnp.asarray(got), (n, 1)), greedy=False)
    rows = np.tile(np.arange(4), n)
    assert np.all(np.isfinite(want[rows, np.asarray(tokens)]))
    assert np.all(np.isfinite(np.asarray(logp)))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(temperature=0.5, top_k=3),
    dict(top_p=0.8),
    dict(temperature=1.5, min_p=0.2),
    dict(forbidden=(0, 3)),
    dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
])
def test_empirical_frequencies_match_the_processed_distribution(kw):
    """χ² goodness of fit over the allowed tokens, 40 000 draws, fixed seed, α = 1e-3."""
    z = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0], np.float32)
    want, _ = reference(z, **kw)
    allowed = np.isfinite(want)
    expected = np.exp(want - np.logaddexp.reduce(want))
    forbidden = kw.pop("forbidden", ())
    processed = controls.process_logits(jnp.asarray(z)[None], forbidden_ids=forbidden, **kw)
    n = 40_000
    keys = jax.random.split(jax.random.key(1234), n)
    tokens, _ = controls.sample(keys, jnp.tile(processed, (n, 1)), greedy=False)
    counts = np.bincount(np.asarray(tokens), minlength=6)
    assert counts[~allowed].sum() == 0
    e = n * expected[allowed]
    chi2 = np.sum((counts[allowed] - e) ** 2 / e)
    dof = int(allowed.sum()) - 1
    assert dof >= 1
    assert chi2 < CHI2_999[dof], (counts, e)


def test_sampling_logprob_is_that_of_the_renormalised_truncated_distribution():
    z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 20)), jnp.float32)
    processed = controls.process_logits(z, temperature=0.7, top_k=6)
    tokens, logp = controls.sample(jax.random.split(jax.random.key(0), 3), processed,
                                   greedy=False)
    want, _ = zip(*[reference(row, temperature=0.7, top_k=6) for row in np.asarray(z)])
    want = np.stack(want)
    want = want - np.logaddexp.reduce(want, axis=1, keepdims=True)
    np.testing.assert_allclose(logp, want[np.arange(3), np.asarray(tokens)], rtol=1e-5)


def test_greedy_takes_the_argmax_of_the_allowed_tokens_with_log_prob_zero():
    z = jnp.asarray([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 1.0, 4.0]], jnp.float32)
    processed = controls.process_logits(z, temperature=0.0, forbidden_ids=(0,))
    tokens, logp = controls.sample(jax.random.split(jax.random.key(0), 2), processed,
                                   greedy=True)
    np.testing.assert_array_equal(tokens, [1, 3])
    np.testing.assert_array_equal(logp, [0.0, 0.0])


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.2),
    ("max_new_tokens", 0), ("num_generations", 0), ("prefix_cache", "copy"),
    ("overlong_prompt", "drop"), ("prompt_buckets", (8, 4)), ("stop_token_ids", (-1,)),
])
def test_bad_sampler_settings_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**{field: value})


def test_out_of_vocabulary_or_all_forbidden_ids_are_rejected():
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplerConfig(stop_token_ids=(7,)).check_vocab(5)
    with pytest.raises(ValueError, match="whole vocabulary"):
        SamplerConfig(forbidden_token_ids=(0, 1, 2)).check_vocab(3)
