"""Fused log-prob/entropy kernels vs the pure-jnp reference (Pallas interpret mode on CPU).

Both kernel paths run on CPU: "tpu" in TPU interpret mode (pltpu.InterpretParams,
uninitialised out-of-bounds block padding is NaN, so missing edge masks show up
as NaN) and "gpu" with interpret=True.

Tolerances: float32 inputs -- forward atol 2e-5 / rtol 1e-5, gradients atol 1e-5
(only the summation order differs from the reference). bfloat16 inputs are
upcast identically by kernel and reference, so the forward keeps float32
tolerances (atol 1e-4 for the O(10) logit scale); bfloat16 gradients are
rounded to bfloat16 on output, so rtol 2e-2 / atol 2e-2·max|g|.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from rlx_kernels import logprob_entropy as le

BLOCKS = {"tpu": dict(block_n=8, block_v=128), "gpu": dict(block_n=16, block_v=128)}
HIDDEN_BLOCKS = {
    "tpu": dict(block_n=8, block_v=128, bwd_chunk=128),
    "gpu": dict(block_n=16, block_v=128, block_d=16, bwd_chunk=128),
}


def _finite(*arrays):
    for a in arrays:
        assert np.all(np.isfinite(np.asarray(a, np.float32))), "non-finite value"


def _numpy_logp_entropy(logits, targets, temperature):
    z = np.asarray(logits, np.float64) / temperature
    mx = z.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(z - mx).sum(-1, keepdims=True)))[..., 0]
    logp_all = z - lse[..., None]
    p = np.exp(logp_all)
    ent = -np.where(p > 0, p * np.where(p > 0, logp_all, 0.0), 0.0).sum(-1)
    logp = np.take_along_axis(logp_all, np.asarray(targets)[..., None], -1)[..., 0]
    return logp, ent


def _inputs(seed, shape, vocab, dtype=jnp.float32, scale=3.0):
    kx, kt = jax.random.split(jax.random.key(seed))
    logits = (jax.random.normal(kx, (*shape, vocab)) * scale).astype(dtype)
    targets = jax.random.randint(kt, shape, 0, vocab)
    return logits, targets


def _loss(fn, g_lp, g_ent):
    def loss(*args):
        lp, ent = fn(*args)
        return jnp.sum(lp * g_lp) + jnp.sum(ent * g_ent)

    return loss


def test_reference_matches_float64_numpy():
    logits, targets = _inputs(0, (3, 5), 37)
    lp, ent = le.reference(logits, targets, temperature=0.7)
    np_lp, np_ent = _numpy_logp_entropy(logits, targets, 0.7)
    np.testing.assert_allclose(lp, np_lp, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ent, np_ent, atol=2e-5, rtol=1e-5)


def _fwd_and_grad(fn, x, g_lp, g_ent):
    """One jitted trace: outputs and the gradient of Σ g_lp·logp + Σ g_ent·H w.r.t. x."""

    @jax.jit
    def run(x):
        (lp, ent), vjp = jax.vjp(fn, x)
        return lp, ent, vjp((g_lp, g_ent))[0]

    return run(x)


def _logits_case(case):
    """(logits, targets, temperature) for a named case; fresh seeded inputs per case."""
    if case == "f32_ragged":  # N=21 rows, V=300: neither a multiple of its block
        logits, targets = _inputs(1, (3, 7), 300)
        return logits, targets, 0.8
    if case == "bf16_block_multiples":  # N=16, V=256
        logits, targets = _inputs(2, (2, 8), 256, dtype=jnp.bfloat16)
        return logits, targets, 1.0
    # "minus_inf_tiny_tail": N=5, V=130 (a 2-column last block); top-k style −inf
    # entries must not turn p·log p into NaN.
    logits, targets = _inputs(3, (5,), 130)
    drop = jax.random.bernoulli(jax.random.key(4), 0.6, logits.shape)
    drop = drop & (jnp.arange(130) != targets[..., None])  # the target stays finite
    return jnp.where(drop, -jnp.inf, logits), targets, 1.3


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", ["f32_ragged", "bf16_block_multiples", "minus_inf_tiny_tail"])
def test_kernel_matches_reference_forward_and_gradient(backend, case):
    logits, targets, temp = _logits_case(case)
    k1, k2 = jax.random.split(jax.random.key(len(case)))
    g_lp, g_ent = jax.random.normal(k1, targets.shape), jax.random.normal(k2, targets.shape)
    kern = lambda x: le.token_logprob_entropy(x, targets, temperature=temp, backend=backend,
                                              **BLOCKS[backend])
    lp, ent, g = _fwd_and_grad(kern, logits, g_lp, g_ent)
    ref_lp, ref_ent, g_ref = _fwd_and_grad(
        lambda x: le.reference(x, targets, temperature=temp), logits, g_lp, g_ent)
    np_lp, np_ent = _numpy_logp_entropy(logits, targets, temp)
    _finite(lp, ent, g)
    assert lp.shape == targets.shape and lp.dtype == ent.dtype == jnp.float32
    assert g.shape == logits.shape and g.dtype == logits.dtype
    # bf16 logits are upcast exactly; only the summation order differs.
    tol = dict(atol=2e-5, rtol=1e-5) if logits.dtype == jnp.float32 else dict(atol=1e-4, rtol=1e-5)
    for out, ref, np_ref in ((lp, ref_lp, np_lp), (ent, ref_ent, np_ent)):
        np.testing.assert_allclose(out, ref, **tol)
        np.testing.assert_allclose(out, np_ref, atol=1e-4, rtol=1e-5)
    g32, gr32 = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
    if logits.dtype == jnp.float32:
        np.testing.assert_allclose(g32, gr32, atol=1e-5)
    else:  # gradient rounded to bf16 on output
        np.testing.assert_allclose(g32, gr32, rtol=2e-2, atol=2e-2 * np.abs(gr32).max())
    if case == "minus_inf_tiny_tail":
        assert np.all(g32[np.isinf(np.asarray(logits))] == 0.0)


@pytest.mark.parametrize(
    "backend,dtype", [("tpu", jnp.float32), ("gpu", jnp.float32), ("gpu", jnp.bfloat16)],
    ids=["tpu-f32", "gpu-f32", "gpu-bf16"],
)
def test_hidden_state_path_matches_reference_forward_and_gradient(backend, dtype):
    """N=21 rows, D=24, V=300: ragged in every blocked axis; bwd_chunk=128 makes the
    backward's last vocabulary chunk overlap the previous one."""
    k = jax.random.split(jax.random.key(41 if dtype == jnp.float32 else 42), 4)
    hidden = jax.random.normal(k[0], (3, 7, 24)).astype(dtype)
    w = (jax.random.normal(k[1], (24, 300)) * 0.4).astype(dtype)
    targets = jax.random.randint(k[2], (3, 7), 0, 300)
    g_lp, g_ent = jax.random.normal(k[3], (2, 3, 7))

    def run(fn):
        @jax.jit
        def f(h, w):
            (lp, ent), vjp = jax.vjp(fn, h, w)
            return lp, ent, vjp((g_lp, g_ent))

        return f(hidden, w)

    lp, ent, grads = run(lambda h, w: le.token_logprob_entropy_from_hidden(
        h, w, targets, temperature=0.9, backend=backend, **HIDDEN_BLOCKS[backend]))
    ref_lp, ref_ent, ref_grads = run(
        lambda h, w: le.reference_from_hidden(h, w, targets, temperature=0.9))
    _finite(lp, ent)
    fwd_tol = dict(atol=1e-4, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(lp, ref_lp, **fwd_tol)
    np.testing.assert_allclose(ent, ref_ent, **fwd_tol)
    for g, gr, x in zip(grads, ref_grads, (hidden, w)):
        assert g.shape == x.shape and g.dtype == x.dtype
        g32, gr32 = np.asarray(g, np.float32), np.asarray(gr, np.float32)
        _finite(g32)
        if dtype == jnp.float32:
            np.testing.assert_allclose(g32, gr32, atol=1e-4, rtol=1e-4)
        else:
            np.testing.assert_allclose(g32, gr32, rtol=3e-2, atol=3e-2 * np.abs(gr32).max())


def test_out_of_range_targets_are_clipped_like_take_along_axis():
    logits, _ = _inputs(51, (4,), 140)
    targets = jnp.array([-100, 0, 139, 1000])
    lp, _ = le.token_logprob_entropy(logits, targets, backend="gpu", **BLOCKS["gpu"])
    np_lp, _ = _numpy_logp_entropy(logits, np.clip(targets, 0, 139), 1.0)
    np.testing.assert_allclose(lp, np_lp, atol=2e-5)


def test_kernel_traces_under_jit_and_reference_backend_is_plain_jnp():
    logits, targets = _inputs(61, (2, 3), 150)
    f = jax.jit(lambda x, t: le.token_logprob_entropy(x, t, backend="gpu", **BLOCKS["gpu"]))
    assert "pallas_call" in str(jax.make_jaxpr(f)(logits, targets))
    ref_jaxpr = jax.make_jaxpr(lambda x, t: le.token_logprob_entropy(x, t, backend="reference"))
    assert "pallas_call" not in str(ref_jaxpr(logits, targets))
    np.testing.assert_allclose(f(logits, targets)[1], le.reference(logits, targets)[1],
                               atol=2e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=jnp.zeros((2, 4))), "targets must be an integer"),
        (dict(targets=jnp.zeros((2, 5), jnp.int32)), "targets shape"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(backend="tpu", block_n=12), "block_n must be a multiple of 8"),
        (dict(backend="tpu", block_v=100), "block_v must be a multiple of 128"),
        (dict(backend="gpu", block_v=96), "block_v must be a power of two"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(logits=jnp.zeros((2, 4, 8), jnp.int32)), "logits must be float32"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(logits=jnp.zeros((2, 4, 8)), targets=jnp.zeros((2, 4), jnp.int32))
    args.update(kwargs)
    logits, targets = args.pop("logits"), args.pop("targets")
    with pytest.raises(ValueError, match=match):
        le.token_logprob_entropy(logits, targets, **args)


def test_hidden_path_bad_input_raises_value_error():
    h, w, t = jnp.zeros((4, 8)), jnp.zeros((8, 32)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="hidden last axis"):
        le.token_logprob_entropy_from_hidden(jnp.zeros((4, 6)), w, t)
    with pytest.raises(ValueError, match="dtype"):
        le.token_logprob_entropy_from_hidden(h.astype(jnp.bfloat16), w, t)
    with pytest.raises(ValueError, match="unembedding must be"):
        le.token_logprob_entropy_from_hidden(h, w[None], t)
    with pytest.raises(ValueError, match="block_d >= 16"):
        le.token_logprob_entropy_from_hidden(h, w, t, backend="gpu", block_d=8)


def test_analytic_scratch_is_small_at_issue_scale():
    """32 × 8k tokens × 152k vocab, bf16: kernel scratch ≪ reference's [N, V] f32."""
    s = le.scratch_bytes(32 * 8192, 151_936, 3584, itemsize=2, block_n=256, block_v=512)
    assert s["kernel_fwd"] < 64 * 2**20  # ~19 MB of double-buffered tiles
    assert s["kernel_bwd_hidden"] <= 256 * 2**20
    assert s["reference"] > 100 * 2**30


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
    n, v, d = 300, 1000, 256

    def logits_grad(x, t):
        return jax.grad(lambda x: sum(a.sum() for a in le.token_logprob_entropy(
            x, t, backend=backend)))(x)

    def hidden_grad(h, w, t):
        return jax.grad(lambda h, w: sum(a.sum() for a in le.token_logprob_entropy_from_hidden(
            h, w, t, backend=backend)), argnums=(0, 1))(h, w)

    t = jnp.zeros((n,), jnp.int32)
    for fn, args in ((logits_grad, (jnp.zeros((n, v), jnp.bfloat16), t)),
                     (hidden_grad, (jnp.zeros((n, d), jnp.bfloat16),
                                    jnp.zeros((d, v), jnp.bfloat16), t))):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert marker in text
