"""Ratio-statistics kernels vs an independent float64 NumPy transcription.

Kernels run on CPU in Pallas interpret mode ("tpu": pltpu.InterpretParams, "gpu":
interpret=True). Tolerances: float32 sums of ≤ 300 terms -- rtol 1e-5,
atol 1e-5·(1 + count); counts, clip counts and min/max are exact (min/max up to
1 ulp of exp). bfloat16 log-probs are upcast exactly, so the same tolerances hold
against the float64 transcription of the upcast values.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from rlx_kernels import ratio_stats as rs

BLOCKS = {"tpu": dict(block_b=8, block_t=128), "gpu": dict(block_b=4, block_t=128),
          "reference": {}}
FIELDS = ("count", "sum_delta", "sum_delta_sq", "sum_log_ratio", "sum_k3", "clip_low",
          "clip_high", "min_ratio", "max_ratio")


def _numpy_stats(new, old, mask, gid, num_groups, eps_low, eps_high, clamp=20.0):
    """float64 transcription: returns ratio [B,T] and dicts of per-row/group/total sums."""
    new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
    valid = np.asarray(mask) != 0
    lr = np.where(valid, np.clip(new - old, -clamp, clamp), 0.0)
    r = np.exp(lr)
    terms = {
        "count": valid * 1.0, "sum_delta": valid * (r - 1), "sum_delta_sq": valid * (r - 1) ** 2,
        "sum_log_ratio": lr, "sum_k3": valid * (r - 1 - lr),
        "clip_low": valid & (r < 1 - eps_low), "clip_high": valid & (r > 1 + eps_high),
    }
    row = {k: v.sum(1) for k, v in terms.items()}
    row["min_ratio"] = np.where(valid, r, np.inf).min(1)
    row["max_ratio"] = np.where(valid, r, -np.inf).max(1)
    gid = np.asarray(gid)
    group = {k: np.array([v[gid == g].sum() for g in range(num_groups)]) for k, v in row.items()
             if k not in ("min_ratio", "max_ratio")}
    group["min_ratio"] = np.array([row["min_ratio"][gid == g].min(initial=np.inf)
                                   for g in range(num_groups)])
    group["max_ratio"] = np.array([row["max_ratio"][gid == g].max(initial=-np.inf)
                                   for g in range(num_groups)])
    total = {k: v.sum() for k, v in row.items() if k not in ("min_ratio", "max_ratio")}
    total["min_ratio"], total["max_ratio"] = row["min_ratio"].min(), row["max_ratio"].max()
    return np.where(valid, r, 1.0), row, group, total


def _inputs(seed, b, t, dtype=jnp.float32, spread=0.3):
    k = jax.random.split(jax.random.key(seed), 3)
    new = (jax.random.normal(k[0], (b, t)) * 0.5 - 2.0).astype(dtype)
    old = (new.astype(jnp.float32) + jax.random.normal(k[1], (b, t)) * spread).astype(dtype)
    mask = jax.random.bernoulli(k[2], 0.7, (b, t))
    return new, old, mask


def _assert_sums(sums, expected):
    count = np.asarray(expected["count"])
    for f in FIELDS:
        got = np.asarray(getattr(sums, f), np.float64)
        if f in ("count", "clip_low", "clip_high"):
            np.testing.assert_array_equal(got, expected[f], err_msg=f)
        elif f in ("min_ratio", "max_ratio"):
            np.testing.assert_allclose(got, expected[f], rtol=2e-7, err_msg=f)
        else:
            assert np.all(np.isfinite(got)), f
            bound = 1e-5 * (1 + count) + 1e-5 * np.abs(expected[f])
            assert np.all(np.abs(got - expected[f]) <= bound), (f, got, expected[f])


@pytest.mark.parametrize(
    "backend,b,t,dtype",
    [("tpu", 13, 300, jnp.float32), ("gpu", 13, 300, jnp.float32),
     ("gpu", 16, 256, jnp.bfloat16), ("reference", 13, 300, jnp.float32),
     ("reference", 16, 256, jnp.bfloat16)],
    ids=["tpu-ragged-f32", "gpu-ragged-f32", "gpu-block_multiples-bf16", "reference-ragged-f32",
         "reference-block_multiples-bf16"],
)
def test_statistics_match_float64_transcription(backend, b, t, dtype):
    """Row 3 is fully masked, group 4 has no rows, group 3 only the masked row."""
    new, old, mask = _inputs(b * 7 + t, b, t, dtype)
    mask = mask.at[3].set(False)
    gid = jnp.array([3 if i == 3 else i % 3 for i in range(b)])
    kw = dict(num_groups=5, eps_low=0.2, eps_high=0.28)
    st = jax.jit(lambda n, o, m, g: rs.ratio_statistics(n, o, m, g, backend=backend, **kw,
                                                        **BLOCKS[backend]))(new, old, mask, gid)
    ratio, row, group, total = _numpy_stats(new, old, mask, gid, 5, 0.2, 0.28)
    assert np.all(np.isfinite(np.asarray(st.ratio)))
    np.testing.assert_allclose(st.ratio, ratio, rtol=2e-7)
    for sums, expected in ((st.sequence, row), (st.group, group), (st.total, total)):
        _assert_sums(sums, expected)
    # empty row / group: count 0, neutral min/max, neutral means, no NaN
    for sums, idx in ((st.sequence, 3), (st.group, 3), (st.group, 4)):
        assert int(sums.count[idx]) == 0
        assert float(sums.min_ratio[idx]) == np.inf and float(sums.max_ratio[idx]) == -np.inf
        assert float(sums.mean_ratio[idx]) == 1.0 and float(sums.var_ratio[idx]) == 0.0
        assert float(sums.clip_fraction[idx]) == 0.0 and float(sums.mean_k3[idx]) == 0.0
    # convenience properties against the float64 transcription
    r_valid = ratio[np.asarray(mask)]
    np.testing.assert_allclose(st.mean_ratio, r_valid.mean(), rtol=1e-6)
    np.testing.assert_allclose(st.var_ratio, r_valid.var(), rtol=1e-4)
    np.testing.assert_allclose(st.total.sum_ratio, r_valid.sum(), rtol=1e-6)
    np.testing.assert_allclose(st.total.sum_ratio_sq, (r_valid ** 2).sum(), rtol=1e-6)
    np.testing.assert_allclose(
        st.clip_fraction, ((r_valid < 0.8) | (r_valid > 1.28)).mean(), rtol=1e-6)
    np.testing.assert_allclose(st.mean_k3, (r_valid - 1 - np.log(r_valid)).mean(), rtol=1e-4)
    np.testing.assert_allclose(
        st.sequence.geometric_mean_ratio[0],
        np.exp(np.log(ratio[0][np.asarray(mask[0])]).mean()), rtol=1e-5)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in st.summary().values()
               if v.ndim == 0 and v is not st.total.min_ratio)


def test_small_ratio_variance_survives_float32_cancellation():
    """Ratios within 1e-4 of 1: Σr²/N − μ² in float32 would lose the variance."""
    new, old, mask = _inputs(5, 8, 256, spread=1e-4)
    st = rs.ratio_statistics(new, old, mask, jnp.zeros(8, jnp.int32), num_groups=1,
                             eps_low=0.2, eps_high=0.2, backend="gpu", **BLOCKS["gpu"])
    r = np.exp(np.asarray(new, np.float64) - np.asarray(old, np.float64))[np.asarray(mask)]
    np.testing.assert_allclose(st.var_ratio, r.var(), rtol=1e-3)


@pytest.mark.parametrize("backend", ["tpu"])  # NaN-filled edge padding: the strictest path
def test_all_tokens_masked_gives_neutral_statistics_and_zero_gradient(backend):
    new, old, _ = _inputs(6, 5, 140)
    mask = jnp.zeros((5, 140), bool)
    new = new.at[0, 0].set(jnp.nan)  # garbage under the mask must not leak
    st = rs.ratio_statistics(new, old, mask, jnp.zeros(5, jnp.int32), num_groups=2,
                             eps_low=0.2, eps_high=0.2, backend=backend, **BLOCKS[backend])
    assert int(st.total.count) == 0 and np.all(np.asarray(st.ratio) == 1.0)
    assert float(st.total.min_ratio) == np.inf and float(st.total.max_ratio) == -np.inf
    for v in (st.mean_ratio, st.var_ratio, st.clip_fraction, st.mean_k3):
        assert np.isfinite(float(v))
    val, g = jax.value_and_grad(lambda x: rs.ratio_variance(x, old, mask, backend=backend,
                                                            **BLOCKS[backend]))(new)
    assert float(val) == 0.0 and np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("backend,about", [("tpu", "mean"), ("gpu", "mean"), ("gpu", "one")])
def test_ratio_variance_gradient_matches_autodiff_and_closed_form(backend, about):
    new, old, mask = _inputs(7 if about == "mean" else 8, 13, 200, spread=0.5)
    old = old.at[2, :5].add(30.0)  # |log r| > clamp: flat, zero gradient
    clamp = 10.0

    @jax.jit
    def both(x):
        kern = jax.value_and_grad(lambda x: rs.ratio_variance(
            x, old, mask, about=about, log_ratio_clamp=clamp, backend=backend,
            **BLOCKS[backend]))(x)
        ref = jax.value_and_grad(lambda x: rs.reference_ratio_variance(
            x, old, mask, about=about, log_ratio_clamp=clamp))(x)
        return kern, ref

    (val, g), (val_ref, g_ref) = both(new)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(val, val_ref, rtol=1e-5)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-8)
    # closed form (2/N)·m·r·(r − c), c = μ or 1, in float64
    m = np.asarray(mask)
    d = np.asarray(new, np.float64) - np.asarray(old, np.float64)
    live = m & (np.abs(d) < clamp)
    r = np.exp(np.clip(d, -clamp, clamp))
    n = m.sum()
    c = r[m].mean() if about == "mean" else 1.0
    np.testing.assert_allclose(val, ((r[m] - c) ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(g, np.where(live, 2.0 / n * r * (r - c), 0.0), rtol=1e-4,
                               atol=1e-8)
    assert np.all(np.asarray(g)[2, :5] == 0.0)
    g_old = jax.grad(lambda o: rs.ratio_variance(new, o, mask, about=about,
                                                 log_ratio_clamp=clamp, backend=backend,
                                                 **BLOCKS[backend]))(old)
    np.testing.assert_allclose(g_old, -np.asarray(g), rtol=1e-5, atol=1e-10)


def test_clip_bounds_can_be_traced_without_recompiling():
    """BAPO adapts eps every step: eps_low/eps_high are runtime scalars."""
    new, old, mask = _inputs(9, 6, 130)
    gid = jnp.zeros(6, jnp.int32)
    f = jax.jit(lambda el, eh: rs.ratio_statistics(new, old, mask, gid, num_groups=1,
                                                   eps_low=el, eps_high=eh, backend="gpu",
                                                   **BLOCKS["gpu"]).total)
    for el, eh in ((0.1, 0.1), (0.3, 0.05)):
        _, _, _, total = _numpy_stats(new, old, mask, gid, 1, el, eh)
        got = f(jnp.float32(el), jnp.float32(eh))
        assert int(got.clip_low) == total["clip_low"] and int(got.clip_high) == total["clip_high"]
    assert f._cache_size() == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(old_logp=jnp.zeros((4, 9))), "old_logp shape"),
        (dict(mask=jnp.ones((4,))), "mask shape"),
        (dict(new_logp=jnp.zeros((4, 8), jnp.int32)), "new_logp must be float32"),
        (dict(group_ids=jnp.zeros((5,), jnp.int32)), "group_ids"),
        (dict(group_ids=jnp.zeros((4,))), "group_ids"),
        (dict(num_groups=0), "num_groups"),
        (dict(eps_low=-0.1), "eps_low"),
        (dict(log_ratio_clamp=0.0), "log_ratio_clamp"),
        (dict(backend="tpu", block_t=100), "block_t must be a multiple of 128"),
        (dict(backend="gpu", block_b=3), "block_b must be a power of two"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(new_logp=jnp.zeros((4, 8)), old_logp=jnp.zeros((4, 8)), mask=jnp.ones((4, 8)),
                group_ids=jnp.zeros((4,), jnp.int32), num_groups=2, eps_low=0.2, eps_high=0.2)
    args.update(kwargs)
    pos = [args.pop(k) for k in ("new_logp", "old_logp", "mask", "group_ids")]
    with pytest.raises(ValueError, match=match):
        rs.ratio_statistics(*pos, **args)
    if "group_ids" not in kwargs and "num_groups" not in kwargs and "eps_low" not in kwargs:
        with pytest.raises(ValueError, match=match):
            rs.ratio_variance(*pos[:3], **{k: v for k, v in args.items()
                                           if k in ("log_ratio_clamp", "backend", "block_b",
                                                    "block_t")})


_SHARDED_SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from rlx_kernels import ratio_stats as rs
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))
    k = jax.random.split(jax.random.key(0), 3)
    B, T = 16, 136
    new = jax.random.normal(k[0], (B, T)) * 0.5 - 2.0
    old = new + jax.random.normal(k[1], (B, T)) * 0.3
    mask = jax.random.bernoulli(k[2], 0.7, (B, T)).at[5].set(False)
    gid = jnp.arange(B) % 3   # every group spans all four shards
    rows = jax.sharding.NamedSharding(mesh, P("data"))
    new_s, old_s, mask_s, gid_s = (jax.device_put(a, rows) for a in (new, old, mask, gid))
    kw = dict(num_groups=4, eps_low=0.2, eps_high=0.28)
    blocks = {"tpu": dict(block_b=8, block_t=128), "gpu": dict(block_b=4, block_t=128),
              "reference": {}}
    import sys
    for backend in sys.argv[1:]:
        bk = blocks[backend]
        # JAX 0.10.2's generic Pallas interpreter (GPU interpret mode) mixes
        # unvarying index arrays with varying refs and fails the vma check; the
        # compiled Triton kernel and the TPU interpreter do not, so only the
        # GPU-interpret run turns the check off.
        vma = backend != "gpu"
        single = rs.ratio_statistics(new, old, mask, gid, backend=backend, **kw, **bk)
        def local(n, o, m, g):
            st = rs.ratio_statistics(n, o, m, g, axis_name="data", backend=backend, **kw, **bk)
            return st.ratio, st.sequence, st.group, st.total
        out = jax.jit(jax.shard_map(
            local, mesh=mesh, in_specs=(P("data"),) * 4, check_vma=vma,
            out_specs=(P("data"), P("data"), P(), P())))(new_s, old_s, mask_s, gid_s)
        for got, want in zip(out, (single.ratio, single.sequence, single.group, single.total)):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        for about in ("mean",):  # "one" differs only in the centre (unit-tested above)
            f1 = lambda x: rs.ratio_variance(x, old, mask, about=about, backend=backend, **bk)
            v1, g1 = jax.value_and_grad(f1)(new)
            def sharded(x):
                def loc(x, o, m):
                    return rs.ratio_variance(x, o, m, about=about, axis_name="data",
                                             backend=backend, **bk)
                return jax.shard_map(loc, mesh=mesh, in_specs=(P("data"),) * 3,
                                     out_specs=P(), check_vma=vma)(x, old_s, mask_s)
            v4, g4 = jax.jit(jax.value_and_grad(sharded))(new_s)
            np.testing.assert_allclose(v4, v1, rtol=1e-6)
            np.testing.assert_allclose(g4, g1, rtol=1e-5, atol=1e-9)
            assert np.all(np.isfinite(np.asarray(g4)))
        print("OK", backend)
""")


@pytest.mark.parametrize(
    "backends",
    [("gpu",), pytest.param(("tpu", "reference"), marks=pytest.mark.slow)],
    ids=["gpu", "tpu+reference"],
)
def test_shard_map_over_four_devices_equals_single_device(backends):
    """Stats and the ratio-variance gradient under shard_map over 4 simulated CPU
    devices equal the single-device result (subprocess: XLA_FLAGS must be set
    before jax is imported). The GPU-interpret kernel run is the default; the
    TPU-interpret and reference runs (~30 s CPU; the reference shares the psum
    code with the kernel path) are marked slow."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, *backends], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == [w for b in backends for w in ("OK", b)]


@pytest.fixture
def native(monkeypatch):
    """Resolve backends as on the real hardware (interpret=False) to cross-lower."""
    from rlx_kernels import dispatch

    orig = dispatch.resolve_backend
    monkeypatch.setattr(dispatch, "resolve_backend",
                        lambda backend="auto", platform=None: orig(backend, platform=backend))


@pytest.mark.parametrize("backend,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_kernels_lower_for_real_hardware_with_default_blocks(native, backend, platform, marker):
    """Cross-lowering runs the Mosaic / Triton lowering on CPU, which enforces the
    hardware block rules (TPU (8, 128) tiles, Triton power-of-two shapes)."""
    b, t = 33, 3000
    x, m, g = jnp.zeros((b, t)), jnp.ones((b, t), bool), jnp.zeros((b,), jnp.int32)

    def both(n, o, m, g):
        st = rs.ratio_statistics(n, o, m, g, num_groups=4, eps_low=0.2, eps_high=0.2,
                                 backend=backend)
        return st, jax.grad(lambda n: rs.ratio_variance(n, o, m, backend=backend))(n)

    text = jax.jit(both).trace(x, x, m, g).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text
