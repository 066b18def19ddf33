"""The sampler decodes with LServe KV-page selection (ModelConfig.decode_page_size)."""

import jax
import numpy as np
import pytest

from rlx.models import api
from rlx.sampling import SamplerConfig, generate

SAMPLED = SamplerConfig(max_new_tokens=8, num_generations=2, return_policy_logprobs=True)


def _paged(cfg, **fields):
    """The graphdef of the same policy with page selection configured."""
    graphdef, _ = api.init(cfg.replace(**fields), seed=0)
    return graphdef


@pytest.mark.parametrize("prefix_cache", ["shared", "repeat"])
def test_page_budget_covering_every_page_equals_dense_decode(policy, prompts, prefix_cache):
    cfg, graphdef, params = policy
    ids, mask = prompts
    config = SAMPLED.replace(prefix_cache=prefix_cache)
    dense = generate(graphdef, params, ids, mask, key=jax.random.key(3), config=config)
    # page size 3 divides neither the prompt bucket nor the completion slots
    paged_gd = _paged(cfg, decode_page_size=3, decode_page_budget=16)
    paged = generate(paged_gd, params, ids, mask, key=jax.random.key(3), config=config)
    np.testing.assert_array_equal(paged.completion_ids, dense.completion_ids)
    np.testing.assert_array_equal(paged.lengths, dense.lengths)
    np.testing.assert_allclose(paged.sampling_logprobs, dense.sampling_logprobs, atol=1e-5)
    np.testing.assert_allclose(paged.policy_logprobs, dense.policy_logprobs, atol=1e-5)


def test_small_page_budget_changes_decode_but_not_prefill(policy, prompts):
    cfg, graphdef, params = policy
    ids, mask = prompts
    config = SAMPLED.replace(temperature=0.0)
    dense = generate(graphdef, params, ids, mask, key=jax.random.key(4), config=config)
    sparse_gd = _paged(cfg, decode_page_size=1, decode_page_budget=0)
    sparse = generate(sparse_gd, params, ids, mask, key=jax.random.key(4), config=config)
    # token 0 comes from the (dense) prefill; decode steps see only sink + local slots
    np.testing.assert_array_equal(sparse.completion_ids[:, 0], dense.completion_ids[:, 0])
    np.testing.assert_allclose(sparse.policy_logprobs[:, 0], dense.policy_logprobs[:, 0],
                               atol=1e-5)
    assert np.all(np.isfinite(sparse.policy_logprobs))
    assert np.all((sparse.completion_ids >= 0) & (sparse.completion_ids < cfg.vocab_size))
    gap = np.abs(np.asarray(sparse.policy_logprobs) - np.asarray(dense.policy_logprobs))
    assert gap[:, 1:].max() > 1e-4
