"""LServe query-aware page selection for decode: summaries, scores, selection, kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx_kernels import paged_decode as pd

B, C, K, H, D, PS = 2, 32, 2, 4, 8, 4  # 8 pages of 4 slots, GQA group 2


def _cache(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    kc, vc, q = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((B, C, K, D), (B, C, K, D), (B, H, D)))
    mask = np.zeros((B, C), bool)
    mask[0, :27] = True  # right-filled row, last page partly written
    mask[1, 6:30] = True  # left-padded row: pages 0 empty, 1 partial
    return q, kc, vc, mask


def test_page_summary_is_per_page_min_max_of_valid_keys():
    _, kc, _, mask = _cache()
    s = pd.page_summary(kc, mask, page_size=PS)
    k = np.asarray(kc)
    for b in range(B):
        for p in range(C // PS):
            valid = mask[b, p * PS:(p + 1) * PS]
            assert s.count[b, p] == valid.sum()
            keys = k[b, p * PS:(p + 1) * PS][valid]
            if valid.any():
                np.testing.assert_array_equal(s.kmax[b, p], keys.max(0))
                np.testing.assert_array_equal(s.kmin[b, p], keys.min(0))
            else:
                assert np.all(np.asarray(s.kmax[b, p]) == 0)


def test_incremental_updates_equal_summary_of_final_cache():
    _, kc, _, mask = _cache(1)
    empty = pd.page_summary(kc, np.zeros_like(mask), page_size=PS)
    update = jax.jit(pd.update_page_summary)
    s = empty
    for slot in range(C):
        s = update(s, kc[:, slot], slot, jnp.asarray(mask[:, slot]))
    full = pd.page_summary(kc, mask, page_size=PS)
    for name in ("kmax", "kmin", "count"):
        np.testing.assert_array_equal(np.asarray(getattr(s, name)), np.asarray(getattr(full, name)), err_msg=name)


def test_page_score_matches_formula_and_bounds_every_key():
    q, kc, _, mask = _cache(2)
    s = pd.page_summary(kc, mask, page_size=PS)
    scores = np.asarray(pd.page_scores(q, s))
    qn, kn = np.asarray(q, np.float64), np.asarray(kc, np.float64)
    kmax, kmin = np.asarray(s.kmax, np.float64), np.asarray(s.kmin, np.float64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            for p in range(C // PS):
                expected = np.sum(np.maximum(qn[b, h] * kmax[b, p, kv], qn[b, h] * kmin[b, p, kv]))
                np.testing.assert_allclose(scores[b, h, p], expected, rtol=1e-5, atol=1e-5)
                valid = mask[b, p * PS:(p + 1) * PS]
                if valid.any():
                    dots = kn[b, p * PS:(p + 1) * PS][valid, kv] @ qn[b, h]
                    assert scores[b, h, p] >= dots.max() - 1e-5


def test_selection_keeps_sink_local_and_best_scoring_pages():
    q, kc, _, mask = _cache(3)
    s = pd.page_summary(kc, mask, page_size=PS)
    scores = np.asarray(pd.page_scores(q, s))
    sel = pd.select_pages(jnp.asarray(scores), s, budget=2, sink_pages=1, local_pages=2)
    idx, valid = np.asarray(sel.index), np.asarray(sel.valid)
    assert idx.shape == (B, H, 5)
    count = np.asarray(s.count)
    for b in range(B):
        pages = np.nonzero(count[b] > 0)[0]
        forced = {pages[0], pages[-1], pages[-2]}
        for h in range(H):
            chosen = set(idx[b, h][valid[b, h]].tolist())
            assert len(chosen) == valid[b, h].sum() == 5
            assert forced <= chosen
            rest = [p for p in pages if p not in forced]
            best = sorted(rest, key=lambda p: -scores[b, h, p])[:2]
            assert chosen == forced | set(best)
            assert list(idx[b, h]) == sorted(idx[b, h])


def test_budget_covering_all_pages_selects_every_nonempty_page():
    q, kc, _, mask = _cache(4)
    s = pd.page_summary(kc, mask, page_size=PS)
    sel = pd.select_pages(pd.page_scores(q, s), s, budget=8, sink_pages=1, local_pages=1)
    for b in range(B):
        pages = np.nonzero(np.asarray(s.count[b]) > 0)[0]
        for h in range(H):
            np.testing.assert_array_equal(np.asarray(sel.index[b, h])[np.asarray(sel.valid[b, h])], pages)
    tmask = np.asarray(pd.selected_token_mask(sel, mask, page_size=PS))
    np.testing.assert_array_equal(tmask, np.broadcast_to(mask[:, None], tmask.shape))


@pytest.mark.parametrize("backend", ["reference", "tpu", "gpu"])
def test_large_budget_equals_dense_decode_and_small_budget_equals_restricted_reference(backend):
    q, kc, vc, mask = _cache(5)
    s = pd.page_summary(kc, mask, page_size=PS)
    run = jax.jit(lambda q, budget: pd.sparse_decode(q, kc, vc, mask, s, budget=budget, backend=backend),
                  static_argnums=1)
    dense = pd.reference_decode_attention(q, kc, vc, mask[:, None])
    out, _ = run(q, 8)
    if backend == "reference":
        np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))
    else:
        np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-6, rtol=1e-6)
    out, sel = run(q, 1)
    restricted = pd.reference_decode_attention(q, kc, vc, pd.selected_token_mask(sel, mask, page_size=PS))
    np.testing.assert_allclose(np.asarray(out), np.asarray(restricted), atol=1e-6, rtol=1e-6)
    assert not np.allclose(np.asarray(out), np.asarray(dense), atol=1e-3)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bfloat16_decode_close_to_float32_reference(backend):
    q, kc, vc, mask = _cache(6, jnp.bfloat16)
    s = pd.page_summary(kc, mask, page_size=PS)
    out, sel = jax.jit(lambda q: pd.sparse_decode(q, kc, vc, mask, s, budget=2, backend=backend))(q)
    assert out.dtype == jnp.bfloat16
    tmask = pd.selected_token_mask(sel, mask, page_size=PS)
    ref = pd.reference_decode_attention(*(x.astype(jnp.float32) for x in (q, kc, vc)), tmask)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2, rtol=3e-2)


def test_bad_inputs_raise_value_error():
    q, kc, vc, mask = _cache()
    with pytest.raises(ValueError, match="page_size"):
        pd.page_summary(kc, mask, page_size=5)
    with pytest.raises(ValueError, match="mask"):
        pd.page_summary(kc, mask[:, :8], page_size=PS)
    s = pd.page_summary(kc, mask, page_size=PS)
    with pytest.raises(ValueError, match="budget"):
        pd.select_pages(pd.page_scores(q, s), s, budget=-1)
    with pytest.raises(ValueError, match=">= 1"):
        pd.select_pages(pd.page_scores(q, s), s, budget=0, sink_pages=0, local_pages=0)
    with pytest.raises(ValueError, match="k_new"):
        pd.update_page_summary(s, kc[:, 0, :1], 0, jnp.ones(B, bool))


def test_decode_kernels_lower_for_tpu_mosaic_and_gpu_triton(monkeypatch):
    """The decode kernels lower to Mosaic (TPU tiling checked) and Triton IR on
    this CPU-only machine. Pins jax 0.10.2 internals (TPU device kind)."""
    from jax import export
    from jax._src.pallas.mosaic import tpu_info

    from rlx_kernels import dispatch

    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    b, c, kh, h, d, ps = 2, 1024, 2, 8, 128, 16
    q = jax.ShapeDtypeStruct((b, h, d), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((b, c, kh, d), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((b, c), jnp.bool_)
    for kind, platform in (("tpu", "tpu"), ("gpu", "cuda")):
        monkeypatch.setattr(dispatch, "resolve_backend", lambda be, kind=kind: dispatch.Resolved(kind, False))

        def step(q, kc, vc, mask):
            s = pd.page_summary(kc, mask, page_size=ps)
            return pd.sparse_decode(q, kc, vc, mask, s, budget=8, sink_pages=2, local_pages=5, backend=kind)[0]

        checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        text = export.export(jax.jit(step), platforms=[platform], disabled_checks=checks)(q, cache, cache,
                                                                                          mask).mlir_module()
        assert ("tpu_custom_call" in text) if kind == "tpu" else ("triton" in text)
