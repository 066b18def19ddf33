"""Decode-step KV-page selection (LServe, arXiv 2502.14866) in the model's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlx.models import api, attention as attn_lib, cache as cache_lib, paged_attention
from rlx.models.config import ModelConfig, model_config
from rlx.models.rope import apply_rope, inverse_frequencies
from rlx.models.transformer import Attention
from rlx_kernels import paged_decode

B, P, H, K, DH = 4, 2, 4, 2, 8  # G = 2 rows per prompt


def _inputs(seed, c, cp):
    """Random decode inputs: row slots with the newest token at slot c-3 (later slots
    empty), left-padded rows, and a left-padded shared prefix of cp slots."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, 1, H, DH)).astype(np.float32)
    k = rng.normal(size=(B, c, K, DH)).astype(np.float32)
    v = rng.normal(size=(B, c, K, DH)).astype(np.float32)
    slot = c - 3
    start = rng.integers(0, 3, size=B)
    idx = np.arange(c)
    allowed = ((idx[None] >= start[:, None]) & (idx[None] <= slot))[:, None, :]
    kp = rng.normal(size=(P, cp, K, DH)).astype(np.float32)
    vp = rng.normal(size=(P, cp, K, DH)).astype(np.float32)
    validp = np.arange(cp)[None] >= np.array([[1], [4]])
    return q, k, v, allowed, (kp, vp, validp)


def _expected(q, keys, values, token_mask):
    """Float64 NumPy softmax attention over token_mask [B, H, N] (GQA by h // R)."""
    r = H // K
    kf = np.repeat(np.asarray(keys, np.float64), r, axis=2)
    vf = np.repeat(np.asarray(values, np.float64), r, axis=2)
    s = np.einsum("bhd,bnhd->bhn", np.asarray(q, np.float64)[:, 0], kf) / np.sqrt(DH)
    s = np.where(token_mask, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhn,bnhd->bhd", w, vf)[:, None]


@pytest.mark.parametrize("with_prefix, page_size", [(True, 1), (False, 3), (True, 4)])
def test_full_budget_equals_dense_decode(with_prefix, page_size):
    q, k, v, allowed, prefix = _inputs(0, 14, 9)
    prefix = prefix if with_prefix else None
    dense = attn_lib.attend(q, k, v, allowed, prefix=prefix)
    paged = paged_attention.decode_attend(q, k, v, allowed, prefix, page_size=page_size,
                                          budget=32, sink_pages=1, local_pages=1)
    assert paged.shape == dense.shape == (B, 1, H, DH)
    np.testing.assert_allclose(paged, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_small_budget_attends_exactly_the_sink_local_and_best_pages(with_prefix):
    page_size, budget, sink, local = 2, 2, 1, 1
    q, k, v, allowed, prefix = _inputs(1, 16, 12)
    prefix = prefix if with_prefix else None
    out, (sel, mask) = paged_attention.decode_attend(
        q, k, v, allowed, prefix, page_size=page_size, budget=budget, sink_pages=sink,
        local_pages=local, return_selection=True)
    # independent NumPy view: prefix region (padded to whole pages) then row slots
    keys, values, valid = k, v, allowed[:, 0]
    if prefix is not None:
        kp, vp, validp = (np.repeat(x, B // P, axis=0) for x in prefix)
        keys = np.concatenate([kp, keys], 1)
        values = np.concatenate([vp, values], 1)
        valid = np.concatenate([validp, valid], 1)
    np.testing.assert_array_equal(mask, valid)
    n_pages = valid.shape[1] // page_size
    page_valid = valid.reshape(B, n_pages, page_size)
    pages = keys.reshape(B, n_pages, page_size, K, DH).astype(np.float64)
    kmax = np.where(page_valid[..., None, None], pages, -np.inf).max(2)
    kmin = np.where(page_valid[..., None, None], pages, np.inf).min(2)
    index, chosen_valid = np.asarray(sel.index), np.asarray(sel.valid)
    token_mask = np.zeros((B, H, valid.shape[1]), bool)
    for b in range(B):
        nonempty = np.flatnonzero(page_valid[b].any(-1))
        forced = {nonempty[0], nonempty[-1]}
        for h in range(H):
            chosen = set(index[b, h][chosen_valid[b, h]].tolist())
            assert len(chosen) == sink + local + budget
            assert forced <= chosen
            qh = q[b, 0, h].astype(np.float64)
            score = np.maximum(qh * kmax[b, :, h // (H // K)],
                               qh * kmin[b, :, h // (H // K)]).sum(-1)
            others = [pg for pg in nonempty if pg not in forced]
            best = sorted(others, key=lambda pg: -score[pg])[:budget]
            assert chosen == forced | set(best)
            for pg in chosen:
                token_mask[b, h, pg * page_size:(pg + 1) * page_size] = \
                    valid[b, pg * page_size:(pg + 1) * page_size]
    want = _expected(q, keys, values, token_mask)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    dense = attn_lib.attend(q, k, v, allowed, prefix=prefix)
    assert np.max(np.abs(np.asarray(out) - np.asarray(dense))) > 1e-3  # really sparse


def test_decode_attend_rejects_multi_token_queries():
    q, k, v, allowed, _ = _inputs(2, 8, 4)
    with pytest.raises(ValueError, match="S=2"):
        paged_attention.decode_attend(np.concatenate([q, q], 1), k, v,
                                      np.concatenate([allowed, allowed], 1),
                                      page_size=2, budget=1)


@pytest.mark.parametrize("change, field", [
    (dict(decode_page_size=-1), "decode_page_size"),
    (dict(decode_page_size=2.5), "decode_page_size"),
    (dict(decode_page_budget=-2), "decode_page_budget"),
    (dict(decode_sink_pages=True), "decode_sink_pages"),
    (dict(decode_local_pages=-1), "decode_local_pages"),
    (dict(decode_page_size=4, decode_page_budget=0, decode_sink_pages=0,
          decode_local_pages=0), "decode_page_budget"),
])
def test_config_rejects_bad_page_selection_fields(change, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        model_config("tiny", **change)


def test_page_selection_defaults_keep_decode_dense():
    cfg = model_config("tiny")
    assert cfg.decode_page_size == 0
    # zero budget is allowed as long as sink/local pages remain
    ModelConfig(**{**_fields(cfg), "decode_page_size": 4, "decode_page_budget": 0})


def _fields(cfg):
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


_step = jax.jit(api.forward_with_cache, static_argnums=0)


def _prefilled(graphdef, params, g, t):
    """Two prompts (one left-padded) prefilled, shared over g rows with t slots."""
    ids = jnp.array([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]], jnp.int32)
    mask = ids > 0
    pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    prefill_logits, cache = _step(graphdef, params, ids, pos, mask,
                                  cache_lib.init_cache(model_config("tiny"), 2, 7), 0)
    return prefill_logits, cache_lib.share_prefix(cache, g, t), pos[:, -1]


def test_model_decode_steps_full_budget_equal_dense_and_prefill_stays_dense():
    cfg = model_config("tiny")
    graphdef, params = api.init(cfg, seed=0)
    paged_gd, _ = api.init(cfg.replace(decode_page_size=2, decode_page_budget=16),
                                      seed=0)
    sparse_gd, _ = api.init(cfg.replace(decode_page_size=1, decode_page_budget=0), seed=0)
    dense_prefill, cache, last = _prefilled(graphdef, params, 2, 6)
    paged_prefill, _, _ = _prefilled(paged_gd, params, 2, 6)
    np.testing.assert_array_equal(paged_prefill, dense_prefill)  # S > 1: dense path
    caches = {"dense": cache, "paged": cache, "sparse": cache}
    gds = {"dense": graphdef, "paged": paged_gd, "sparse": sparse_gd}
    tok = jnp.array([[11], [12], [13], [14]], jnp.int32)
    pos = jnp.repeat(last, 2)[:, None]
    gap = 0.0
    for t in range(3):
        logits = {}
        for name in gds:
            logits[name], caches[name] = _step(gds[name], params, tok, pos + t + 1,
                                               jnp.ones((4, 1), bool), caches[name], t)
        np.testing.assert_allclose(logits["paged"], logits["dense"], atol=1e-5, rtol=1e-5)
        gap = max(gap, float(jnp.max(jnp.abs(logits["sparse"] - logits["dense"]))))
        tok = jnp.argmax(logits["dense"][:, -1], -1)[:, None].astype(jnp.int32)
    assert gap > 1e-4  # one sink + one local page of one slot really drops keys


def test_attention_layer_decode_output_is_reference_over_selected_pages():
    cfg = model_config("tiny", decode_page_size=2, decode_page_budget=1)
    attn = Attention(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(4)
    b, c, layer, slot = 4, 10, 1, 8
    shape = (cfg.num_layers, b, c, cfg.num_kv_heads, cfg.head_dim)
    mask = np.zeros((b, c), bool)
    mask[:, 1:slot + 1] = True
    cache = cache_lib.KVCache(
        k=jnp.asarray(rng.normal(size=shape), jnp.float32),
        v=jnp.asarray(rng.normal(size=shape), jnp.float32), mask=jnp.asarray(mask),
        prefix_k=jnp.asarray(rng.normal(size=(2, 2, 5) + shape[3:]), jnp.float32),
        prefix_v=jnp.asarray(rng.normal(size=(2, 2, 5) + shape[3:]), jnp.float32),
        prefix_mask=jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool))
    x = jnp.asarray(rng.normal(size=(b, 1, cfg.hidden_size)), jnp.float32)
    positions = jnp.full((b, 1), 12, jnp.int32)
    allowed = attn_lib.allowed_mask(jnp.array([slot]), jnp.arange(c), jnp.asarray(mask))
    out, (ck, cv) = attn(x, positions, {"slot": jnp.int32(slot), "allowed": allowed},
                         layer, cache)
    # independent: project, rotate, page the keys, attend only to the selected pages
    inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q = apply_rope(attn.q_proj(x).reshape(b, 1, cfg.num_heads, cfg.head_dim), positions, inv)
    k_new = apply_rope(attn.k_proj(x).reshape(b, 1, cfg.num_kv_heads, cfg.head_dim),
                       positions, inv)
    np.testing.assert_allclose(ck[:, slot], k_new[:, 0], atol=1e-6)
    prefix = (cache.prefix_k[layer], cache.prefix_v[layer], cache.prefix_mask)
    keys, values, kv_mask, summary = paged_attention.paged_view(ck, cv, allowed[:, 0], prefix,
                                                                page_size=2)
    sel = paged_decode.select_pages(paged_decode.page_scores(q[:, 0], summary), summary,
                                    budget=1, sink_pages=1, local_pages=1)
    assert int(jnp.sum(sel.valid[0, 0])) == 3 < int(jnp.sum(summary.count[0] > 0))
    tmask = paged_decode.selected_token_mask(sel, kv_mask, page_size=2)
    ref = paged_decode.reference_decode_attention(q[:, 0], keys, values, tmask)
    want = attn.o_proj(ref.reshape(b, 1, cfg.num_heads * cfg.head_dim))
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
