"""Block-sparse attention kernels (TPU and GPU, interpret mode) vs the jnp reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx_kernels import attention_schedules as sl
from rlx_kernels import block_sparse_attention as bsa


def _qkv(seed, b, s, h, kh, d, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((b, s, h, d), (b, s, kh, d), (b, s, kh, d)))


def _numpy_attention(q, k, v, mask, scale):
    """Independent float64 transcription: softmax over allowed keys, 0 if none."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, h, d = q.shape
    g = h // k.shape[2]
    mask = np.broadcast_to(np.asarray(mask), (b, h, s, s))
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi] @ k[bi, :, hi // g].T * scale
            for a in range(s):
                allowed = mask[bi, hi, a]
                if not allowed.any():
                    continue
                z = logits[a, allowed]
                p = np.exp(z - z.max())
                out[bi, a, hi] = (p / p.sum()) @ v[bi, allowed, hi // g]
    return out


def _loss(out, cot):
    return jnp.sum(out.astype(jnp.float32) * cot)


def _check_against_reference(q, k, v, schedule, seg, backend, atol, rtol):
    cot = np.random.default_rng(7).standard_normal(q.shape).astype(np.float32)

    @jax.jit
    def both(q, k, v):
        def run(fn):
            return jax.value_and_grad(lambda q, k, v: _loss(fn(q, k, v), cot), argnums=(0, 1, 2))(q, k, v)[1]

        kern = lambda q, k, v: bsa.block_sparse_attention(q, k, v, schedule, segment_ids=seg, backend=backend)  # noqa
        ref = lambda q, k, v: bsa.reference_block_sparse_attention(q, k, v, schedule, segment_ids=seg)  # noqa
        return kern(q, k, v), ref(q, k, v), run(kern), run(ref)

    out, ref, grads, ref_grads = both(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol, rtol=rtol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(rg, np.float32), atol=atol, rtol=rtol,
                                   err_msg=f"d{name}")
    return out, grads


def test_reference_matches_float64_numpy_attention():
    q, k, v = _qkv(0, 2, 9, 4, 2, 8)
    seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, -1], [0, 0, 0, 0, 0, 0, 0, -1, -1]])
    mask = sl.token_mask(seg, 9)
    out = jax.jit(lambda q, k, v: bsa.reference_attention(q, k, v, mask, sm_scale=0.3))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, mask, 0.3), atol=1e-5)


# Two rows of Prefix Grouper segments with padding (S = 21, not a block multiple).
SEG = np.array([[0] * 6 + [1] * 6 + [2] * 6 + [-1] * 3, [0] * 10 + [1] * 4 + [2] * 5 + [-1] * 2])


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernel_matches_reference_streaming_heads_on_prefix_grouper_rows(backend):
    # Per-row (B=2) and per-head schedule: head 0 streams (sink + local window),
    # head 1 is dense over the Prefix Grouper segments; GQA (H=2 over K=1);
    # block_q != block_k.
    schedule = sl.streaming_schedule(21, streaming_heads=[True, False], sink_blocks=1, local_blocks=1, block_q=16,
                                     block_k=8, segment_ids=SEG)
    assert schedule.kv_index.shape[:2] == (2, 2)
    q, k, v = _qkv(2, 2, 21, 2, 1, 16)
    out, grads = _check_against_reference(q, k, v, schedule, SEG, backend, atol=2e-5, rtol=2e-5)
    pad = SEG < 0  # padding queries output 0 and send no gradient
    assert np.all(np.asarray(out)[pad] == 0)
    assert np.all(np.asarray(grads[0])[pad] == 0)


def test_dense_kernel_matches_reference_and_numpy():
    # All-blocks causal schedule, no segments, S = 13 (GPU: forward + grads).
    schedule = sl.dense_causal_schedule(13, block_q=8, block_k=8)
    q, k, v = _qkv(3, 1, 13, 2, 2, 16)
    expected = _numpy_attention(q, k, v, sl.token_mask(None, 13), 16 ** -0.5)
    out, _ = _check_against_reference(q, k, v, schedule, None, "gpu", atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)
    tpu = jax.jit(lambda q, k, v: bsa.dense_attention(q, k, v, block_q=8, block_k=8, backend="tpu"))(q, k, v)
    np.testing.assert_allclose(np.asarray(tpu), expected, atol=2e-5)


@pytest.mark.parametrize("backend", ["gpu", pytest.param("tpu", marks=pytest.mark.slow)])
def test_bfloat16_kernel_close_to_float32_reference(backend):
    schedule = sl.prefix_grouper_schedule(SEG[:1], block_q=8, block_k=8)
    q, k, v = _qkv(4, 1, 21, 2, 1, 16, jnp.bfloat16)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    cot = np.random.default_rng(5).standard_normal(q.shape).astype(np.float32)
    kern = lambda q, k, v: bsa.block_sparse_attention(q, k, v, schedule, segment_ids=SEG[:1], backend=backend)  # noqa
    ref = lambda q, k, v: bsa.reference_block_sparse_attention(q, k, v, schedule, segment_ids=SEG[:1])  # noqa

    @jax.jit
    def run(q, k, v, q32, k32, v32):
        grad = lambda f, *a: jax.grad(lambda q, k, v: _loss(f(q, k, v), cot), argnums=(0, 1, 2))(*a)  # noqa
        return kern(q, k, v), ref(q32, k32, v32), grad(kern, q, k, v), grad(ref, q32, k32, v32)

    out, ref_out, g, rg = run(q, k, v, q32, k32, v32)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=3e-2, rtol=3e-2)
    for name, a, b in zip("qkv", g, rg):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=4e-2 * scale, err_msg=f"d{name}")


def test_arbitrary_block_mask_with_an_empty_query_block_matches_reference():
    # Any causal block mask is a valid schedule; query block 1 visits nothing
    # (its rows output 0), other blocks skip random key blocks.
    rng = np.random.default_rng(9)
    causal = sl.causal_block_mask(30, block_q=8, block_k=8)
    mask = causal & (rng.random(causal.shape) < 0.6)
    mask[..., np.arange(4), np.arange(4)] = True
    mask[..., 1, :] = False
    schedule = sl.make_schedule(mask, seq_len=30, block_q=8, block_k=8)
    q, k, v = _qkv(10, 1, 30, 2, 1, 16)
    out, grads = _check_against_reference(q, k, v, schedule, None, "gpu", atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(out)[:, 8:16] == 0) and np.all(np.asarray(grads[0])[:, 8:16] == 0)


def test_auto_backend_follows_dispatcher(monkeypatch):
    from rlx_kernels import dispatch

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert jax.default_backend() == "cpu"  # auto → the jnp reference
    schedule = sl.dense_causal_schedule(8, block_q=8, block_k=8)
    q, k, v = _qkv(11, 1, 8, 2, 1, 16)
    ref = bsa.reference_attention(q, k, v, sl.token_mask(None, 8))
    np.testing.assert_array_equal(np.asarray(bsa.block_sparse_attention(q, k, v, schedule)), np.asarray(ref))
    with dispatch.force_backend("gpu"):
        out = bsa.block_sparse_attention(q, k, v, schedule)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_streaming_heads_ignore_keys_outside_sink_and_window():
    # Changing a key outside a streaming head's blocks changes only dense heads.
    s = 24
    schedule = sl.streaming_schedule(s, streaming_heads=[True, False], sink_blocks=1, local_blocks=1, block_q=16,
                                     block_k=8)
    q, k, v = _qkv(6, 1, s, 2, 2, 16)
    v2 = v.at[:, 10].add(5.0)  # block 1: neither sink (block 0) nor local for query block 2
    f = jax.jit(lambda v: bsa.block_sparse_attention(q, k, v, schedule, backend="gpu"))
    o1, o2 = f(v), f(v2)
    np.testing.assert_array_equal(np.asarray(o1[:, 16:, 0]), np.asarray(o2[:, 16:, 0]))
    assert not np.allclose(np.asarray(o1[:, 16:, 1]), np.asarray(o2[:, 16:, 1]))


# --------------------------------------------------------------------------- #
# Prefix Grouper: packed row == naive repeated-prompt batch (log-probs, grads)
# --------------------------------------------------------------------------- #


def test_prefix_grouper_packed_row_equals_naive_batch_logprobs_and_grads():
    # Kernel on the packed row vs the reference on the naive [prompt | ci] rows;
    # per-token features stand in for q/k/v projections (with RoPE applied).
    lp, g, t, h, kh, d, vocab = 7, 3, 5, 2, 1, 16, 11
    plen, lens = 6, np.array([5, 2, 4])
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(1, vocab, lp)
    comp_ids = rng.integers(1, vocab, (g, t))
    packed = jax.tree.map(np.asarray, sl.prefix_grouper_pack(prompt_ids, plen, comp_ids, lens))
    n_tok, n_seg, _, n_logit_index, n_mask = map(np.asarray, sl.naive_group_rows(prompt_ids, plen, comp_ids, lens))
    np.testing.assert_array_equal(n_tok[:, :plen], np.repeat(prompt_ids[None, :plen], g, 0))

    # Source rows: prompt tokens [0, lp), completion (i, j) at lp + i·t + j, zero row last.
    zero = lp + g * t
    src_packed = np.full(lp + g * t, zero)
    src_packed[:plen] = np.arange(plen)
    ii, jj = np.nonzero(packed.completion_mask)
    src_packed[packed.token_index[ii, jj]] = lp + ii * t + jj
    slot = np.arange(lp + t)[None, :]
    src_naive = np.where(slot < plen, slot, np.where(slot < plen + lens[:, None], lp + np.arange(g)[:, None] * t
                                                     + slot - plen, zero))

    shapes = dict(pq=(lp, h, d), pk=(lp, kh, d), pv=(lp, kh, d), cq=(g, t, h, d), ck=(g, t, kh, d),
                  cv=(g, t, kh, d))
    feats = {n: jnp.asarray(rng.standard_normal(shp), jnp.float32) for n, shp in shapes.items()}
    w = jnp.asarray(rng.standard_normal((h * d, vocab)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(g, t)) * n_mask, jnp.float32)
    pg_sched = sl.prefix_grouper_schedule(packed.segment_ids[None], block_q=4, block_k=4)
    naive_sched = sl.prefix_grouper_schedule(n_seg, block_q=8, block_k=8)

    def table(f, n):
        rows = [f["p" + n], f["c" + n].reshape(g * t, *f["c" + n].shape[2:])]
        return jnp.concatenate(rows + [jnp.zeros_like(rows[0][:1])], 0)

    def token_logprobs(out, logit_index, mask, targets):  # out [S, H, Dh]; index/mask/targets [..., T]
        logp = jax.nn.log_softmax(out.reshape(out.shape[0], -1) @ w, axis=-1)
        per = sl.prefix_grouper_unpack(logp, logit_index, mask)
        return jnp.take_along_axis(per, targets[..., None], -1)[..., 0] * mask

    def packed_lp(f, seg):
        # ``seg`` is traced under jit, as in a model: the schedule is built on device.
        q, k, v = (table(f, n)[src_packed][None] for n in "qkv")
        out = bsa.dense_attention(q, k, v, segment_ids=seg, block_q=4, block_k=4, backend="gpu")
        return token_logprobs(out[0], packed.logit_index, packed.completion_mask, jnp.asarray(comp_ids))

    def naive_lp(f):
        q, k, v = (table(f, n)[src_naive] for n in "qkv")
        out = bsa.block_sparse_attention(q, k, v, naive_sched, segment_ids=n_seg, backend="reference")
        return jax.vmap(token_logprobs)(out, n_logit_index, n_mask, jnp.asarray(comp_ids))

    @jax.jit
    def both(f, seg):
        grad = lambda fn: jax.grad(lambda f: jnp.sum(fn(f) * weights))(f)  # noqa: E731
        packed_fn = functools.partial(packed_lp, seg=seg)
        return packed_fn(f), naive_lp(f), grad(packed_fn), grad(naive_lp)

    lp_packed, lp_naive, g_packed, g_naive = both(feats, jnp.asarray(packed.segment_ids[None]))
    np.testing.assert_allclose(np.asarray(lp_packed), np.asarray(lp_naive), atol=1e-5, rtol=1e-5)
    for name in feats:
        assert float(jnp.max(jnp.abs(g_naive[name]))) > 0, name
        np.testing.assert_allclose(np.asarray(g_packed[name]), np.asarray(g_naive[name]), atol=2e-5, rtol=2e-5,
                                   err_msg=name)
    # The packed schedule visits fewer block pairs than the dense causal one.
    dense = sl.causal_block_mask(lp + g * t, block_q=4, block_k=4)
    assert int(np.asarray(pg_sched.block_mask).sum()) < int(dense.sum())


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #


def test_bad_inputs_raise_value_error():
    schedule = sl.dense_causal_schedule(8, block_q=8, block_k=8)
    q, k, v = np.zeros((1, 8, 4, 8), np.float32), np.zeros((1, 8, 2, 8), np.float32), np.zeros((1, 8, 2, 8), np.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        bsa.block_sparse_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), schedule,
                                   backend="reference")
    with pytest.raises(ValueError, match="seq_len"):
        bsa.block_sparse_attention(q[:, :7], k[:, :7], v[:, :7], schedule, backend="reference")
    with pytest.raises(ValueError, match="segment_ids"):
        bsa.block_sparse_attention(q, k, v, schedule, segment_ids=np.zeros((1, 7), np.int32), backend="reference")
    with pytest.raises(ValueError, match="dtype"):
        bsa.block_sparse_attention(q, k.astype(np.float16), v, schedule, backend="reference")
    with pytest.raises(ValueError, match="multiples of 128"):
        bsa._check_hardware_blocks("tpu", schedule, 8)
    with pytest.raises(ValueError, match="power of two"):
        bsa._check_hardware_blocks("gpu", sl.dense_causal_schedule(48, block_q=24, block_k=24), 64)
    bsa._check_hardware_blocks("gpu", sl.dense_causal_schedule(64, block_q=16, block_k=32), 64)


# --------------------------------------------------------------------------- #
# Hardware lowering without hardware
# --------------------------------------------------------------------------- #


def test_kernels_lower_for_tpu_mosaic_and_gpu_triton(monkeypatch):
    """Forward and backward lower to Mosaic (TPU tiling rules checked at
    lowering) and to Triton IR on this CPU-only machine, with hardware-legal
    blocks. Pins jax 0.10.2 internals: the TPU lowering asks for a device kind."""
    from jax import export
    from jax._src.pallas.mosaic import tpu_info

    from rlx_kernels import dispatch

    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    s = 300
    seg = np.zeros((1, s), np.int32)
    seg[:, 100:200], seg[:, 200:] = 1, 2
    q = jax.ShapeDtypeStruct((1, s, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, s, 2, 128), jnp.bfloat16)
    for kind, platform, block in (("tpu", "tpu", 128), ("gpu", "cuda", 64)):
        monkeypatch.setattr(dispatch, "resolve_backend", lambda b, kind=kind: dispatch.Resolved(kind, False))
        sched = sl.streaming_schedule(s, streaming_heads=[True, False, True, False], sink_blocks=1, local_blocks=1,
                                      block_q=block, block_k=block, segment_ids=seg)
        f = lambda q, k, v: bsa.block_sparse_attention(q, k, v, sched, segment_ids=seg, backend=kind)  # noqa
        grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
        checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        exported = export.export(jax.jit(grad), platforms=[platform], disabled_checks=checks)(q, kv, kv)
        text = exported.mlir_module()
        assert ("tpu_custom_call" in text) if kind == "tpu" else ("triton" in text)
