"""Model unit tests: cache decoding, value/reward heads, rope scaling, configs, bf16."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.models import api, cache as cache_lib
from rlx.models.config import ModelConfig, RopeScaling, model_config
from rlx.models.rope import inverse_frequencies

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, qkv_bias=True, tie_embeddings=False,
                  rope_theta=500.0, rms_norm_eps=1e-5,
                  rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32))
ATOL = 2e-5


@pytest.fixture(scope="module")
def policy():
    return api.init(CFG, seed=0)


def _padded(lengths, side, width, seed=0, pad=0):
    rng = np.random.default_rng(seed)
    tokens = np.full((len(lengths), width), pad, np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        tokens[i, sl] = rng.integers(1, CFG.vocab_size, n)
        mask[i, sl] = True
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


# Jitted once per shape: op-by-op dispatch of a whole model compiles every primitive.
_logits = jax.jit(api.logits, static_argnums=0)
_step = jax.jit(api.forward_with_cache, static_argnums=0)
_values = jax.jit(api.values, static_argnums=0)
_rewards = jax.jit(api.rewards, static_argnums=0)
_logprobs = jax.jit(api.token_logprobs, static_argnums=0, static_argnames="chunk_size")


# ------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("side", ["left", "right"])
def test_cache_decode_reproduces_full_forward_position_by_position(policy, side):
    graphdef, params = policy
    tokens, mask, positions = _padded([6, 3, 1], side, width=6, seed=1)
    full = np.asarray(_logits(graphdef, params, tokens, positions, mask))
    cache = cache_lib.init_cache(CFG, 3, 6)
    logits, cache = _step(graphdef, params, tokens[:, :2], positions[:, :2], mask[:, :2],
                          cache, 0)
    pieces = [np.asarray(logits)]
    for t in range(2, 6):
        logits, cache = _step(graphdef, params, tokens[:, t:t + 1], positions[:, t:t + 1],
                             mask[:, t:t + 1], cache, t)
        pieces.append(np.asarray(logits))
    decoded = np.concatenate(pieces, 1)
    np.testing.assert_allclose(decoded[mask], full[mask], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.mask), mask)


def test_shared_prefix_group_decode_matches_full_forward(policy):
    """P prompts prefilled once, G continuations per prompt decoded against the shared
    prefix, equal the full forward of each [prompt, continuation] row."""
    graphdef, params = policy
    p, g, sp, t_len = 2, 3, 5, 4
    prompt, pmask, ppos = _padded([5, 2], "left", width=sp, seed=2)
    rng = np.random.default_rng(3)
    cont = rng.integers(1, CFG.vocab_size, (p * g, t_len)).astype(np.int32)
    _, prefix = _step(graphdef, params, prompt, ppos, pmask,
                      cache_lib.init_cache(CFG, p, sp), 0)
    cache = cache_lib.share_prefix(prefix, g, t_len)
    naive = cache_lib.repeat_rows(prefix, g, extra_slots=t_len)
    start = np.repeat(pmask.sum(1), g)[:, None]
    shared, copied = [], []
    for t in range(t_len):
        pos = (start + t).astype(np.int32)
        one = np.ones((p * g, 1), bool)
        logits, cache = _step(graphdef, params, cont[:, t:t + 1], pos, one, cache, t)
        shared.append(np.asarray(logits))
        logits, naive = _step(graphdef, params, cont[:, t:t + 1], pos, one, naive, sp + t)
        copied.append(np.asarray(logits))
    shared, copied = np.concatenate(shared, 1), np.concatenate(copied, 1)
    rows = np.concatenate([np.repeat(prompt, g, 0), cont], 1)
    rmask = np.concatenate([np.repeat(pmask, g, 0), np.ones_like(cont, bool)], 1)
    rpos = np.maximum(np.cumsum(rmask, 1) - 1, 0).astype(np.int32)
    full = np.asarray(_logits(graphdef, params, rows, rpos, rmask))[:, sp:]
    np.testing.assert_allclose(shared, full, atol=ATOL, rtol=0)
    np.testing.assert_allclose(copied, full, atol=ATOL, rtol=0)


def _stacked_slot_major(cache):
    """The same cache as one stacked [L, B, C, K, Dh] array per k/v (older layout)."""
    def stack(xs, to_slots):
        return None if xs is None else jnp.stack([to_slots(x) for x in xs])
    keys, values = cache_lib.keys_to_slots, cache_lib.values_to_slots
    return cache.replace(k=stack(cache.k, keys), v=stack(cache.v, values),
                         prefix_k=stack(cache.prefix_k, keys),
                         prefix_v=stack(cache.prefix_v, values))


def test_a_stacked_slot_major_cache_decodes_like_per_layer_buffers(policy):
    graphdef, params = policy
    p, g, sp = 2, 2, 5
    prompt, pmask, ppos = _padded([5, 3], "left", width=sp, seed=7)
    _, prefix = _step(graphdef, params, prompt, ppos, pmask,
                      cache_lib.init_cache(CFG, p, sp), 0)
    cache = cache_lib.share_prefix(prefix, g, 3)
    assert len(cache.k) == CFG.num_layers == len(cache.v)
    assert cache.k[0].shape == (p * g, 2, 8, 3) and cache.v[0].shape == (p * g, 2, 3, 8)
    tok = np.array([[3], [4], [5], [6]], np.int32)
    pos = np.repeat(pmask.sum(1), g)[:, None].astype(np.int32)
    one = np.ones((p * g, 1), bool)
    want, per_layer = _step(graphdef, params, tok, pos, one, cache, 0)
    got, stacked = _step(graphdef, params, tok, pos, one, _stacked_slot_major(cache), 0)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert stacked.k.shape == (CFG.num_layers, p * g, 3, 2, 8)
    np.testing.assert_array_equal(stacked.k, _stacked_slot_major(per_layer).k)
    np.testing.assert_array_equal(stacked.v, _stacked_slot_major(per_layer).v)


def _instructions(hlo: str, shape: str) -> list[str]:
    """Opcodes of the HLO instructions (fusions by name) whose result is ``shape``."""
    pat = r"%(\S+) = " + re.escape(shape) + r"\{[^}]*\} ([\w-]+)\("
    return [op if op != "fusion" else name for name, op in re.findall(pat, hlo)]


def test_a_decode_step_updates_the_cache_in_place(policy):
    """One decode step on a donated cache: each layer's buffers (keys [B, K, Dh, C],
    values [B, K, C, Dh]) are updated and read where they lie. Neither a copy of a
    buffer, nor a slot-major [B, C, K, Dh] layer, nor a stacked [L, ...] cache appears
    in the compiled step."""
    graphdef, params = policy
    b, c = 3, 7
    step = jax.jit(api.forward_with_cache, static_argnums=0, donate_argnums=5)
    cache = cache_lib.init_cache(CFG, b, c)
    tok, one = np.ones((b, 1), np.int32), np.ones((b, 1), bool)
    hlo = step.lower(graphdef, params, tok, tok, one, cache, 2).compile().as_text()
    assert cache.k[0].shape == (b, 2, 8, c) and cache.v[0].shape == (b, 2, c, 8)
    for layer in ("f32[3,2,8,7]", "f32[3,2,7,8]"):
        ops = _instructions(hlo, layer)
        assert not [op for op in ops if "copy" in op or "transpose" in op], ops
    for other in ("f32[3,7,2,8]", "f32[2,3,2,8,7]", "f32[2,3,2,7,8]", "f32[2,3,7,2,8]"):
        assert not _instructions(hlo, other), other


def test_single_query_attention_equals_the_general_path():
    """attend_one_query (S = 1, the cache's layout) = the einsum path of ``attend`` for
    one of two identical queries, with a shared prefix and masked keys."""
    from rlx.models import attention as attn_lib
    rng = np.random.default_rng(8)
    p, g, t, tp, h, kh, dh = 2, 3, 5, 4, 4, 2, 8
    b = p * g
    r = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    q, k, v = r(b, 1, h, dh), r(b, t, kh, dh), r(b, t, kh, dh)
    prefix = (r(p, tp, kh, dh), r(p, tp, kh, dh), jnp.asarray(rng.random((p, tp)) < 0.7))
    allowed = jnp.asarray(rng.random((b, 1, t)) < 0.6).at[:, :, 0].set(True)
    keys, values = cache_lib.keys_from_slots, cache_lib.values_from_slots
    one = attn_lib.attend_one_query(q, keys(k), values(v), allowed,
                                    (keys(prefix[0]), values(prefix[1]), prefix[2]))
    two = attn_lib.attend(jnp.concatenate([q, q], 1), k, v,
                          jnp.concatenate([allowed, allowed], 1), prefix)
    np.testing.assert_allclose(one[:, 0], two[:, 0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(attn_lib.attend(q, k, v, allowed, prefix), one, atol=0, rtol=0)


def test_padding_tokens_do_not_leak_into_real_positions(policy):
    graphdef, params = policy
    tokens, mask, positions = _padded([4, 2, 6], "left", width=6, seed=4)
    other = np.where(mask, tokens, 17).astype(np.int32)
    a = np.asarray(_logits(graphdef, params, tokens, positions, mask))
    b = np.asarray(_logits(graphdef, params, other, positions, mask))
    np.testing.assert_allclose(a[mask], b[mask], atol=1e-6, rtol=0)


def test_token_logprobs_equal_log_softmax_of_logits(policy):
    graphdef, params = policy
    tokens, mask, positions = _padded([6, 4, 1], "right", width=6, seed=5)
    targets = np.roll(tokens, -1, axis=1)
    logp, ent = _logprobs(graphdef, params, tokens, targets, positions, mask,
                                   chunk_size=4)
    z = np.asarray(_logits(graphdef, params, tokens, positions, mask), np.float64)
    logsm = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - z.max(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(logp),
                               np.take_along_axis(logsm, targets[..., None], -1)[..., 0],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), -(np.exp(logsm) * logsm).sum(-1), atol=1e-5)


# ------------------------------------------------------------------------ value / reward


def _with_random_head(params, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params["head"]["kernel"].value = jax.random.normal(k1, params["head"]["kernel"].shape)
    params["head"]["bias"].value = jax.random.normal(k2, params["head"]["bias"].shape)
    return params


def test_value_model_gives_one_float32_value_per_token():
    graphdef, params = api.init(CFG, kind="value", seed=1)
    tokens, mask, positions = _padded([5, 3], "left", width=5, seed=6)
    values = _values(graphdef, params, tokens, positions, mask)
    assert values.shape == (2, 5) and values.dtype == jnp.float32
    np.testing.assert_array_equal(values, 0.0)  # zero-initialised head
    params = _with_random_head(params, 0)
    left = np.asarray(_values(graphdef, params, tokens, positions, mask))
    rt, rm, rp = _padded([5, 3], "right", width=5, seed=6)
    right = np.asarray(_values(graphdef, params, rt, rp, rm))
    np.testing.assert_allclose(left[mask], right[rm], atol=1e-5)
    assert np.std(left[mask]) > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_model_reads_last_real_token(side):
    graphdef, params = api.init(CFG, kind="reward", seed=2)
    params = _with_random_head(params, 1)
    tokens, mask, positions = _padded([6, 2, 4], side, width=6, seed=7)
    rewards = np.asarray(_rewards(graphdef, params, tokens, positions, mask))
    assert rewards.shape == (3,)
    trunk = jax.jit(lambda p, *xs: api.merge(graphdef, p).trunk(*xs)[0])
    hidden = np.asarray(trunk(params, tokens, positions, mask))
    kernel = np.asarray(params["head"]["kernel"].value)[:, 0]
    bias = float(np.asarray(params["head"]["bias"].value)[0])
    last = [np.flatnonzero(row)[-1] for row in mask]
    expected = [hidden[i, j] @ kernel + bias for i, j in enumerate(last)]
    np.testing.assert_allclose(rewards, expected, atol=1e-5)
    other = {"left": "right", "right": "left"}[side]
    ot, om, op = _padded([6, 2, 4], other, width=6, seed=7)
    np.testing.assert_allclose(_rewards(graphdef, params, ot, op, om), rewards, atol=1e-5)


# ------------------------------------------------------------------------ rope


def _llama3_reference(head_dim, theta, factor, low, high, old_len):
    """Scalar float64 transcription of the Llama 3 frequency rule (arXiv 2407.21783)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(freq)
        elif wavelen > old_len / low:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


@pytest.mark.parametrize("head_dim, theta, factor, low, high, old_len", [
    (64, 500_000.0, 8.0, 1.0, 4.0, 8192),
    (128, 500_000.0, 32.0, 1.0, 4.0, 8192),
    (16, 500.0, 4.0, 1.0, 4.0, 32),
    (32, 10_000.0, 2.0, 2.0, 8.0, 256),
])
def test_llama3_rope_scaling_matches_reference(head_dim, theta, factor, low, high, old_len):
    scaling = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                          original_max_position_embeddings=old_len)
    ours = inverse_frequencies(head_dim, theta, scaling)
    ref = _llama3_reference(head_dim, theta, factor, low, high, old_len)
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    plain = inverse_frequencies(head_dim, theta)
    np.testing.assert_allclose(plain, 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim))
    wavelen = 2 * math.pi / plain
    if np.any(wavelen > old_len / low):  # at least one band actually rescaled
        assert not np.allclose(ours, plain)


# ------------------------------------------------------------------------ configs


@pytest.mark.parametrize("change, field", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=2.0), "num_layers"),
    (dict(head_dim=15), "head_dim"),
    (dict(hidden_size=30, head_dim=None), "head_dim"),
    (dict(dtype="float64"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(attention_backend="flash"), "attention_backend"),
])
def test_config_rejects_bad_fields(change, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        CFG.replace(**change)


def test_model_config_presets_and_overrides():
    assert model_config("tiny").num_layers == 2
    assert model_config("qwen2.5-0.5b", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        model_config("gpt5")
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['layers'\]"):
        model_config("tiny", layers=3)
    assert ModelConfig(**{**CFG.__dict__, "rope_scaling": {"factor": 2.0}}).rope_scaling \
        == RopeScaling(factor=2.0)


def test_param_count_matches_params():
    for cfg in (CFG, CFG.replace(tie_embeddings=True, qkv_bias=False)):
        _, params = api.abstract_init(cfg)
        assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == cfg.num_params


# ------------------------------------------------------------------------ bf16


def test_bfloat16_compute_runs_and_tracks_float32(policy):
    graphdef32, params32 = policy
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    graphdef, _ = api.abstract_init(cfg)
    params = api.cast_params(params32, jnp.bfloat16)
    tokens, mask, positions = _padded([6, 3], "left", width=6, seed=8)
    logits = _logits(graphdef, params, tokens, positions, mask)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    ref = np.asarray(_logits(graphdef32, params32, tokens, positions, mask))
    err = np.abs(np.asarray(logits) - ref)[mask].max() / np.abs(ref[mask]).max()
    assert err < 0.1
    logp, ent = _logprobs(graphdef, params, tokens, tokens, positions, mask)
    assert logp.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logp)))
    cache = cache_lib.init_cache(cfg, 2, 6)
    assert cache.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in cache.k + cache.v)
    step_logits, _ = _step(graphdef, params, tokens, positions, mask, cache, 0)
    assert bool(jnp.all(jnp.isfinite(step_logits)))
