"""The model's attention backends: kernel paths equal the reference path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.models import api, config
from rlx_kernels import dispatch

CFG = config.model_config("tiny", vocab_size=64, attention_block=8)


def _batch(b=3, s=21, seed=0):
    rng = np.random.default_rng(seed)
    toks = jnp.asarray(rng.integers(0, 64, (b, s)))
    mask = np.ones((b, s), bool)
    mask[0, :5] = False           # left padding
    mask[1, -4:] = False          # right padding
    return toks, jnp.asarray(mask)


def _logits(cfg, params, toks, mask, segment_ids=None):
    graphdef, _ = api.abstract_init(cfg)
    return api.logits(graphdef, params, toks, None, mask, segment_ids=segment_ids)


@pytest.mark.parametrize("backend", ["dense_kernel", "block_sparse"])
@pytest.mark.parametrize("path", ["reference", "tpu"])
def test_kernel_backend_logits_equal_reference_backend(backend, path):
    _, params = api.init(CFG, seed=0)
    toks, mask = _batch()
    ref = _logits(CFG, params, toks, mask)
    with dispatch.force_backend(path):
        got = _logits(dataclasses.replace(CFG, attention_backend=backend), params, toks, mask)
    m = np.asarray(mask)[..., None]
    np.testing.assert_allclose(np.asarray(got) * m, np.asarray(ref) * m, atol=2e-5)


def test_block_sparse_prefix_grouper_segments_equal_reference_masking():
    _, params = api.init(CFG, seed=1)
    toks, _ = _batch(b=2, s=20)
    seg = jnp.asarray(np.repeat([[0] * 6 + [1] * 5 + [2] * 4 + [3] * 5], 2, axis=0))
    mask = jnp.ones_like(seg, bool)
    ref = _logits(CFG, params, toks, mask, segment_ids=seg)
    got = _logits(dataclasses.replace(CFG, attention_backend="block_sparse"), params, toks,
                  mask, segment_ids=seg)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_streaming_heads_only_change_outputs_through_far_keys():
    cfg = dataclasses.replace(CFG, attention_backend="block_sparse", streaming_heads=(0, 1),
                              streaming_sink_blocks=1, streaming_local_blocks=1)
    _, params = api.init(cfg, seed=2)
    toks = jnp.asarray(np.random.default_rng(3).integers(0, 64, (1, 32)))
    mask = jnp.ones_like(toks, bool)
    dense = _logits(CFG, params, toks, mask)
    sparse = _logits(cfg, params, toks, mask)
    # Queries in the first two blocks see only sink + local blocks = everything causal.
    np.testing.assert_allclose(sparse[:, :16], dense[:, :16], atol=2e-5)
    assert float(jnp.max(jnp.abs(sparse[:, 24:] - dense[:, 24:]))) > 1e-4


def test_streaming_head_indices_are_validated():
    with pytest.raises(ValueError, match="streaming_heads"):
        config.model_config("tiny", streaming_heads=(9,))
