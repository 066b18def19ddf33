"""Off-policy corrections (rlx.objectives.offpolicy) against float64 NumPy
transcriptions of their formulas, and their composition with ``compose``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlx.objectives import compose, group_advantages, grpo_advantages, offpolicy as O
from rlx.objectives import surrogates, token_mean
from rlx.objectives.types import PolicyBatch, TokenOutputs


# ----------------------------------------------------------- float64 transcriptions
def np_level(lr, m, level, clamp=20.0):
    lr = np.where(m > 0, np.float64(lr), 0.0)
    out = np.zeros_like(lr)
    for b in range(lr.shape[0]):
        idx = np.flatnonzero(m[b] > 0)
        if level == "token":
            out[b] = lr[b]
        elif level == "sequence":
            out[b] = lr[b, idx].sum()
        else:
            out[b] = lr[b, idx].sum() / max(len(idx), 1)
    return np.clip(out, -clamp, clamp) * (m > 0)


def np_band(lr, m, level, mode, low, high):
    m = (m > 0).astype(np.float64)
    r = np.exp(np_level(lr, m, level))
    outside = ((r < low) | (r > high)) * m
    if mode == "truncate":
        w = np.clip(r, low, high)
    elif mode == "mask":
        w = r * (1 - outside)
    else:
        w = 1 - outside
    return w * m, outside.sum() / max(m.sum(), 1.0)


def np_mismatch(old, samp, m):
    m = (m > 0).astype(np.float64)
    d = (np.float64(old) - samp) * m
    n = max(m.sum(), 1.0)
    return {"gap_mean": d.sum() / n, "gap_abs_mean": np.abs(d).sum() / n,
            "gap_abs_max": np.abs(d).max(), "kl_k3": ((np.expm1(d) - d) * m).sum() / n}


def _arrays(seed, b=6, t=7, scale=1.0):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 0.6, (b, t)).astype(np.float32)
    samp = (old + scale * rng.normal(0, 0.7, (b, t))).astype(np.float32)
    m = (rng.random((b, t)) < 0.75).astype(np.float32)
    m[0] = 0.0                              # a row with no valid token
    return old, samp, m


LEVELS = ("token", "sequence", "geometric")


# -------------------------------------------------------------------- the bands
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode,low,high", [("truncate", 0.0, 1.5), ("truncate", 0.6, 1.4),
                                           ("mask", 0.5, 2.0), ("reject", 0.8, 1.25)])
def test_band_weights_match_float64_transcription(level, mode, low, high):
    old, samp, m = _arrays(0)
    w, frac = O.band_weights(jnp.asarray(old - samp), jnp.asarray(m), level=level, mode=mode,
                             low=low, high=high)
    want_w, want_frac = np_band(old - samp, m, level, mode, low, high)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(frac), want_frac, rtol=1e-6)
    assert np.all(np.asarray(w)[m == 0] == 0)
    assert 0.0 < want_frac < 1.0 or level != "token"   # the case exercises both sides


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), level=st.sampled_from(LEVELS),
       mode=st.sampled_from(("truncate", "mask", "reject")),
       low=st.floats(0.0, 0.9), width=st.floats(0.2, 3.0), scale=st.floats(0.0, 3.0))
def test_band_weights_property(seed, level, mode, low, width, scale):
    old, samp, m = _arrays(seed, scale=scale)
    high = low + width
    w, frac = O.band_weights(jnp.asarray(old - samp), jnp.asarray(m), level=level, mode=mode,
                             low=low, high=high)
    want_w, want_frac = np_band(old - samp, m, level, mode, low, high)
    # ratios within float32 rounding of a band edge may fall either side: compare the rest
    r = np.exp(np_level(old - samp, m, level))
    edge = (np.abs(r - low) < 1e-4 * max(low, 1e-3)) | (np.abs(r - high) < 1e-4 * high)
    np.testing.assert_allclose(np.asarray(w)[~edge], want_w[~edge], rtol=2e-5, atol=1e-6)
    if not edge.any():
        np.testing.assert_allclose(float(frac), want_frac, rtol=1e-6, atol=1e-9)
    if mode == "truncate":
        assert np.all(np.asarray(w)[m > 0] <= high * (1 + 1e-6))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_truncated_and_masked_is_agree_with_surrogates_truncated_is_weights(level, mode):
    old, samp, m = _arrays(3)
    ref_w, ref_frac = surrogates.truncated_is_weights(jnp.asarray(old), jnp.asarray(samp),
                                                      jnp.asarray(m), level=level, mode=mode,
                                                      cap=1.7)
    if mode == "truncate":
        w, frac = O.truncated_is(jnp.asarray(old), jnp.asarray(samp), jnp.asarray(m),
                                 level=level, cap=1.7)
    else:
        w, frac = O.masked_is(jnp.asarray(old), jnp.asarray(samp), jnp.asarray(m),
                              level=level, low=0.0, high=1.7)
    np.testing.assert_allclose(np.asarray(w), np.asarray(ref_w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(frac), float(ref_frac), rtol=1e-6)


def test_masked_is_without_reweighting_keeps_unit_weights_inside_the_band():
    old, samp, m = _arrays(4)
    w, frac = O.masked_is(jnp.asarray(old), jnp.asarray(samp), jnp.asarray(m), low=0.5,
                          high=2.0, reweight=False)
    w = np.asarray(w)
    assert set(np.unique(w[m > 0])) <= {0.0, 1.0}
    r = np.exp(np.float64(old) - samp)
    np.testing.assert_array_equal(w[m > 0] == 0, ((r < 0.5) | (r > 2.0))[m > 0])
    assert 0 < float(frac) < 1


# ------------------------------------------------------------ decoupled (seed 003)
def np_decoupled(old, beh, samp, m, band, reweight, cap, dlevel="token", slevel="token"):
    d, d_frac = np_band(beh - samp, m, dlevel, "mask" if reweight else "reject", *band)
    if cap is None:
        s, s_frac = (m > 0).astype(np.float64), 0.0
    else:
        s, s_frac = np_band(old - beh, m, slevel, "truncate", 0.0, cap)
    return d * s, d_frac, s_frac


@pytest.mark.parametrize("dlevel,slevel", [("token", "token"), ("sequence", "token"),
                                           ("geometric", "sequence")])
@pytest.mark.parametrize("reweight,cap", [(True, 2.0), (False, 1.5), (True, None)])
def test_decoupled_is_weights_match_float64_transcription(dlevel, slevel, reweight, cap):
    rng = np.random.default_rng(5)
    old, samp, m = _arrays(5, scale=0.3)
    beh = (samp + rng.normal(0, 0.4, samp.shape)).astype(np.float32)
    w, metrics = O.decoupled_is_weights(jnp.asarray(old), jnp.asarray(beh), jnp.asarray(samp),
                                        jnp.asarray(m), discrepancy_level=dlevel,
                                        discrepancy_band=(0.6, 1.6),
                                        discrepancy_reweight=reweight, staleness_level=slevel,
                                        staleness_cap=cap)
    want, d_frac, s_frac = np_decoupled(old, beh, samp, m, (0.6, 1.6), reweight, cap,
                                        dlevel, slevel)
    np.testing.assert_allclose(np.asarray(w), want, rtol=3e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["offpolicy/discrepancy_masked"]), d_frac, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["offpolicy/staleness_truncated"]), s_frac,
                               rtol=1e-6)


def test_decoupled_reduces_to_each_single_factor():
    old, samp, m = _arrays(6)
    o, s, mm = map(jnp.asarray, (old, samp, m))
    # no staleness (behaviour logits = old logits): only the discrepancy band acts
    w, _ = O.decoupled_is_weights(o, o, s, mm, discrepancy_band=(0.5, 2.0), staleness_cap=3.0)
    ref, _ = O.masked_is(s * 0 + o, s, mm, low=0.5, high=2.0)
    np.testing.assert_allclose(np.asarray(w), np.asarray(ref), rtol=1e-6)
    # no discrepancy (behaviour logits = sampler logits): only the staleness cap acts
    w, met = O.decoupled_is_weights(o, s, s, mm, discrepancy_band=(0.5, 2.0), staleness_cap=1.3)
    ref, frac = O.truncated_is(o, s, mm, cap=1.3)
    np.testing.assert_allclose(np.asarray(w), np.asarray(ref), rtol=1e-6)
    assert float(met["offpolicy/discrepancy_masked"]) == 0.0
    assert float(met["offpolicy/staleness_truncated"]) == pytest.approx(float(frac))


def test_missing_old_logits_entangle_the_band_with_staleness():
    """The seed paper's semantic mismatch: a discrepancy band applied to the entangled
    ratio π_old/π_infer masks legitimately stale tokens; with the old logits it masks
    only the engine's outliers."""
    rng = np.random.default_rng(7)
    b, t = 32, 16
    samp = rng.normal(-1.5, 0.5, (b, t)).astype(np.float32)
    beh = samp + rng.normal(0, 0.02, (b, t)).astype(np.float32)       # engine noise
    outlier = rng.random((b, t)) < 0.05
    beh = np.where(outlier, beh + 2.0, beh).astype(np.float32)        # engine outliers
    old = (beh + rng.normal(0, 0.9, (b, t))).astype(np.float32)        # several versions on
    m = np.ones((b, t), np.float32)
    band = (0.5, 2.0)
    _, entangled = O.masked_is(jnp.asarray(old), jnp.asarray(samp), jnp.asarray(m),
                               low=band[0], high=band[1])
    _, met = O.decoupled_is_weights(jnp.asarray(old), jnp.asarray(beh), jnp.asarray(samp),
                                    jnp.asarray(m), discrepancy_band=band)
    decoupled = float(met["offpolicy/discrepancy_masked"])
    assert decoupled == pytest.approx(outlier.mean(), abs=1e-6)      # exactly the outliers
    assert float(entangled) > 4 * decoupled                          # stale tokens masked too


# ------------------------------------------- approximate route: revised PPO-EWMA
def np_ewma(versions, decay):
    """θ̄_v = Σ_i β^{v−i} θ_i / Σ_i β^{v−i}, n = Σ_i β^{v−i}, age = Σ_i (v−i) β^{v−i} / n."""
    v = len(versions) - 1
    w = np.array([decay ** (v - i) for i in range(v + 1)], np.float64)
    avg = sum(wi * np.float64(x) for wi, x in zip(w, versions)) / w.sum()
    age = (w * np.arange(v, -1, -1)).sum() / w.sum()
    return avg, w.sum(), age


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_ewma_update_matches_float64_transcription(decay):
    rng = np.random.default_rng(20)
    versions = [{"w": rng.normal(0, 1, (3, 4)).astype(np.float32),
                 "b": rng.normal(0, 1, (4,)).astype(np.float32)} for _ in range(6)]
    state = O.ewma_init(jax.tree.map(jnp.asarray, versions[0]))
    update = jax.jit(functools.partial(O.ewma_update, decay=decay))
    for v in range(1, len(versions)):
        state = update(state, jax.tree.map(jnp.asarray, versions[v]))
        for name in ("w", "b"):
            want, n, age = np_ewma([x[name] for x in versions[:v + 1]], decay)
            np.testing.assert_allclose(np.asarray(state["params"][name]), want, rtol=1e-5,
                                       atol=1e-6)
        np.testing.assert_allclose(float(state["weight"]), n, rtol=1e-6)
        np.testing.assert_allclose(float(state["age"]), age, rtol=1e-5, atol=1e-7)
    if decay == 0.0:                     # the proximal policy is the current one, bitwise
        for name in ("w", "b"):
            np.testing.assert_array_equal(np.asarray(state["params"][name]), versions[-1][name])
    assert float(state["age"]) < decay / (1 - decay) + 1e-6    # → β/(1−β) from below


def test_ewma_init_copies_and_update_validates_the_decay():
    params = {"w": jnp.ones((2, 2))}
    state = O.ewma_init(params)
    assert state["params"]["w"] is not params["w"]
    assert float(state["weight"]) == 1.0 and float(state["age"]) == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="decay="):
            O.ewma_update(state, params, decay=bad)


def np_ewma_weights(prox, samp, m, level, band, reweight, cap):
    w, frac = np_band(prox - samp, m, level, "mask" if reweight else "reject", *band)
    if cap is not None:
        mm = (m > 0).astype(np.float64)
        frac = frac + ((w > cap) * mm).sum() / max(mm.sum(), 1.0)
        w = np.minimum(w, cap) * mm
    return w, frac


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("reweight,cap", [(True, None), (False, None), (True, 1.3)])
def test_ewma_decoupled_weights_match_float64_transcription(level, reweight, cap):
    prox, samp, m = _arrays(21, scale=0.6)
    w, frac = O.ewma_decoupled_weights(jnp.asarray(prox), jnp.asarray(samp), jnp.asarray(m),
                                       level=level, band=(0.5, 2.0), reweight=reweight, cap=cap)
    want, want_frac = np_ewma_weights(prox, samp, m, level, (0.5, 2.0), reweight, cap)
    np.testing.assert_allclose(np.asarray(w), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(frac), want_frac, rtol=1e-6)
    assert np.all(np.asarray(w)[m == 0] == 0)


def np_ewma_loss(logp, prox, samp, adv, m, eps, band, cap):
    w, frac = np_ewma_weights(prox, samp, m, "token", band, True, cap)
    r = np.exp(np.float64(logp) - prox)
    surr = np.minimum(r * adv, np.clip(r, 1 - eps[0], 1 + eps[1]) * adv)
    return -w * surr * (m > 0), frac


def test_ewma_decoupled_loss_matches_transcription_and_compose():
    """The revised PPO-EWMA token loss equals its float64 transcription and, summed, the
    composed PPO-clip objective with old_logp = π_prox and ``ewma_decoupled_weights``
    as its ``is_correction`` (what the asynchronous trainer runs); its gradient goes
    through logp only."""
    rng = np.random.default_rng(22)
    prox, samp, m = _arrays(22, scale=0.5)
    logp = (prox + rng.normal(0, 0.3, prox.shape)).astype(np.float32)
    adv = (rng.normal(0, 1, prox.shape) * m).astype(np.float32)
    kw = dict(band=(0.5, 2.0), cap=1.6)
    tok, frac = O.ewma_decoupled_loss(*map(jnp.asarray, (logp, prox, samp, adv, m)),
                                      eps_low=0.2, eps_high=0.28, **kw)
    want, want_frac = np_ewma_loss(logp, prox, samp, adv, m, (0.2, 0.28), kw["band"], kw["cap"])
    np.testing.assert_allclose(np.asarray(tok), want, rtol=3e-5, atol=1e-6)
    np.testing.assert_allclose(float(frac), want_frac, rtol=1e-6)
    obj = compose(advantages=group_advantages(grpo_advantages),
                  surrogate=functools.partial(surrogates.ppo_clip_loss, eps_low=0.2,
                                              eps_high=0.28),
                  aggregation=token_mean,
                  is_correction=functools.partial(O.ewma_decoupled_weights, **kw))
    pb = PolicyBatch(mask=jnp.asarray(m), old_logp=jnp.asarray(prox), advantages=jnp.asarray(adv),
                     sampler_logp=jnp.asarray(samp))
    out = obj.loss(TokenOutputs(logp=jnp.asarray(logp)), pb, obj.init())
    np.testing.assert_allclose(float(out.loss), want.sum() / m.sum(), rtol=2e-5)
    g = jax.grad(lambda lp, pr: O.ewma_decoupled_loss(lp, pr, *map(jnp.asarray, (samp, adv, m)),
                                                      **kw)[0].sum(), argnums=(0, 1))
    g_logp, g_prox = g(jnp.asarray(logp), jnp.asarray(prox))
    assert np.abs(np.asarray(g_logp)).sum() > 0 and np.all(np.asarray(g_prox) == 0)


def test_ewma_weights_are_global_over_the_named_axis():
    prox, samp, m = _arrays(23, b=8, scale=0.8)
    whole_w, whole_frac = O.ewma_decoupled_weights(jnp.asarray(prox), jnp.asarray(samp),
                                                   jnp.asarray(m), level="geometric", cap=1.5)
    split = lambda x: jnp.asarray(x).reshape(2, 4, -1)  # noqa: E731
    w, frac = jax.vmap(functools.partial(O.ewma_decoupled_weights, level="geometric", cap=1.5,
                                         axis_name="d"), axis_name="d")(
        split(prox), split(samp), split(m))
    np.testing.assert_allclose(np.asarray(w).reshape(8, -1), np.asarray(whole_w), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(frac), float(whole_frac), rtol=1e-6)
    assert 0 < float(whole_frac) < 1


# ---------------------------------------------------------------- diagnostics
def test_mismatch_metrics_match_float64_transcription():
    old, samp, m = _arrays(8)
    got = O.mismatch_metrics(jnp.asarray(old), jnp.asarray(samp), jnp.asarray(m), prefix="x")
    want = np_mismatch(old, samp, m)
    for k, v in want.items():
        np.testing.assert_allclose(float(got[f"x/{k}"]), v, rtol=2e-5, atol=1e-7)
    assert float(got["x/kl_k3"]) >= 0


def test_statistics_are_global_over_the_named_axis():
    """Under a named axis (as under shard_map) the fractions and the gap metrics are
    those of the whole batch, identical on every shard."""
    old, samp, m = _arrays(9, b=8)
    whole_w, whole_frac = O.masked_is(jnp.asarray(old), jnp.asarray(samp), jnp.asarray(m),
                                      level="sequence", low=0.3, high=3.0)
    whole = O.mismatch_metrics(jnp.asarray(old), jnp.asarray(samp), jnp.asarray(m))

    def per_shard(o, s, mm):
        w, frac = O.masked_is(o, s, mm, level="sequence", low=0.3, high=3.0, axis_name="d")
        return w, frac, O.mismatch_metrics(o, s, mm, axis_name="d")

    split = lambda x: jnp.asarray(x).reshape(2, 4, -1)  # noqa: E731
    w, frac, met = jax.vmap(per_shard, axis_name="d")(split(old), split(samp), split(m))
    np.testing.assert_allclose(np.asarray(w).reshape(8, -1), np.asarray(whole_w), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(frac), float(whole_frac), rtol=1e-6)
    for k, v in whole.items():
        np.testing.assert_allclose(np.asarray(met[k]), float(v), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------- composition
def _objective(**kw):
    return compose(advantages=group_advantages(grpo_advantages),
                   surrogate=functools.partial(surrogates.ppo_clip_loss, eps_low=0.2),
                   aggregation=token_mean, **kw)


def _policy_batch(seed=10):
    rng = np.random.default_rng(seed)
    old, samp, m = _arrays(seed)
    logp = (old + rng.normal(0, 0.05, old.shape)).astype(np.float32)
    adv = rng.normal(0, 1, old.shape).astype(np.float32) * m
    pb = PolicyBatch(mask=jnp.asarray(m), old_logp=jnp.asarray(old), advantages=jnp.asarray(adv),
                     sampler_logp=jnp.asarray(samp))
    return logp, pb


def test_compose_multiplies_the_surrogate_by_the_correction():
    logp, pb = _policy_batch()
    corr = functools.partial(O.truncated_is, level="geometric", cap=1.4)
    obj = _objective(is_correction=corr)
    out = obj.loss(TokenOutputs(logp=jnp.asarray(logp)), pb, obj.init())
    old, samp, m, adv = (np.asarray(x, np.float64) for x in
                         (pb.old_logp, pb.sampler_logp, pb.mask, pb.advantages))
    r = np.exp(np.float64(logp) - old)
    tok = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.2)) * m
    w, frac = np_band(old - samp, m, "geometric", "truncate", 0.0, 1.4)
    np.testing.assert_allclose(float(out.loss), (tok * w).sum() / m.sum(), rtol=2e-5)
    np.testing.assert_allclose(float(out.metrics["is/frac_corrected"]), frac, rtol=1e-6)
    assert "sampler_logp" in obj.needs


def test_monitor_and_monitored_log_the_gap_without_changing_the_loss():
    logp, pb = _policy_batch(11)
    plain = _objective()
    with_reg = _objective(regularizers=(O.mismatch_monitor(),))
    wrapped = O.monitored(plain)
    outputs = TokenOutputs(logp=jnp.asarray(logp))
    base = plain.loss(outputs, pb, plain.init())
    want = np_mismatch(np.asarray(pb.old_logp), np.asarray(pb.sampler_logp), np.asarray(pb.mask))
    for obj in (with_reg, wrapped):
        out = obj.loss(outputs, pb, obj.init())
        assert float(out.loss) == float(base.loss)
        for k, v in want.items():
            np.testing.assert_allclose(float(out.metrics[f"offpolicy/{k}"]), v, rtol=2e-5,
                                       atol=1e-7)
    g0 = jax.grad(lambda lp: plain.loss(TokenOutputs(logp=lp), pb, plain.init()).loss)(
        jnp.asarray(logp))
    g1 = jax.grad(lambda lp: wrapped.loss(TokenOutputs(logp=lp), pb, wrapped.init()).loss)(
        jnp.asarray(logp))
    np.testing.assert_array_equal(np.asarray(g0), np.asarray(g1))
    # a batch without sampler log-probs: nothing added, nothing fails
    out = wrapped.loss(outputs, pb.replace(sampler_logp=None), wrapped.init())
    assert not any(k.startswith("offpolicy/") for k in out.metrics)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw,match", [
    (dict(level="row"), "level must be one of"),
    (dict(mode="clip"), "mode must be one of"),
    (dict(low=2.0, high=1.0), "0 <= low < high"),
    (dict(low=-0.1, high=1.0), "0 <= low < high"),
])
def test_bad_arguments_raise_naming_the_field(kw, match):
    old, samp, m = _arrays(12)
    with pytest.raises(ValueError, match=match):
        O.band_weights(jnp.asarray(old - samp), jnp.asarray(m), **kw)


def test_shape_mismatch_names_the_array():
    old, samp, m = _arrays(13)
    with pytest.raises(ValueError, match="sampler_logp has shape"):
        O.truncated_is(jnp.asarray(old), jnp.asarray(samp[:, :3]), jnp.asarray(m))
    with pytest.raises(ValueError, match="sampler_logp has shape"):
        O.ewma_decoupled_weights(jnp.asarray(old), jnp.asarray(samp[:, :3]), jnp.asarray(m))
    with pytest.raises(ValueError, match="cap="):
        O.ewma_decoupled_weights(jnp.asarray(old), jnp.asarray(samp), jnp.asarray(m), cap=0.0)
    with pytest.raises(ValueError, match="behaviour_logp has shape"):
        O.decoupled_is_weights(jnp.asarray(old), jnp.asarray(samp[:3]), jnp.asarray(samp),
                               jnp.asarray(m))
