"""generate against cache-free forwards: greedy tokens, log-probs, group cache layouts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.models import api
from rlx.sampling import SamplerConfig, controls, decode, generate, prefill, prepare
from rlx.sampling.generate import device_inputs

GREEDY = SamplerConfig(max_new_tokens=8, temperature=0.0, return_policy_logprobs=True)
SAMPLED = SamplerConfig(max_new_tokens=8, num_generations=2, return_policy_logprobs=True)
TRUNCATED = SamplerConfig(max_new_tokens=8, num_generations=2, temperature=0.7, top_k=40,
                          top_p=0.9, min_p=0.01, forbidden_token_ids=(3, 4, 5),
                          return_policy_logprobs=True)


def teacher_forced_logits(graphdef, params, rollout):
    """[B, T, V] logits predicting each completion token, from one cache-free forward."""
    tokens, mask, positions = rollout.sequences()
    logits = jax.jit(lambda *a: api.logits(graphdef, params, *a))(tokens, positions, mask)
    sp, t = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    return logits[:, sp - 1: sp - 1 + t]


def test_greedy_equals_step_by_step_argmax_of_the_full_forward(policy, prompts):
    _, graphdef, params = policy
    ids, mask = prompts
    out = generate(graphdef, params, ids, mask, key=jax.random.key(0), config=GREEDY)
    # reference: right-padded sequences, one cache-free forward per new token
    full = jax.jit(lambda t, m: api.logits(graphdef, params, t, None, m))
    seqs = np.zeros((3, 16), np.int32)
    lengths = mask.sum(1)
    for p in range(3):
        seqs[p, :lengths[p]] = ids[p][mask[p]]
    for _ in range(8):
        valid = np.arange(16)[None] < lengths[:, None]
        logits = full(jnp.asarray(seqs), jnp.asarray(valid))
        seqs[np.arange(3), lengths] = np.argmax(logits[np.arange(3), lengths - 1], -1)
        lengths = lengths + 1
    want = np.stack([seqs[p, lengths[p] - 8: lengths[p]] for p in range(3)])
    np.testing.assert_array_equal(out.completion_ids[:, :8], want)
    np.testing.assert_array_equal(out.sampling_logprobs, 0.0)
    assert bool(jnp.all(out.truncated)) and not bool(jnp.any(out.finished))


def test_logprobs_equal_a_teacher_forced_forward(policy, prompts):
    _, graphdef, params = policy
    ids, mask = prompts
    out = generate(graphdef, params, ids, mask, key=jax.random.key(1), config=SAMPLED)
    tokens, attn, positions = out.sequences()
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    forward = jax.jit(lambda *a: api.token_logprobs(graphdef, params, *a)[0])
    logp = forward(tokens, targets, positions, attn)
    sp = out.prompt_ids.shape[1]
    want = np.where(out.completion_mask, logp[:, sp - 1: sp - 1 + 16], 0.0)
    np.testing.assert_allclose(out.sampling_logprobs, want, atol=1e-5)
    np.testing.assert_allclose(out.policy_logprobs, want, atol=1e-5)
    np.testing.assert_array_equal(out.lengths, 8)
    np.testing.assert_array_equal(out.group_id, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(out.prompt_ids[::2], out.prompt_ids[1::2])
    assert not np.array_equal(out.completion_ids[0], out.completion_ids[1])


def test_truncated_logprobs_are_those_of_the_distribution_sampled_from(policy, prompts):
    _, graphdef, params = policy
    ids, mask = prompts
    out = generate(graphdef, params, ids, mask, key=jax.random.key(2), config=TRUNCATED)
    logits = teacher_forced_logits(graphdef, params, out)
    processed = controls.process_logits(
        logits, temperature=0.7, top_k=40, top_p=0.9, min_p=0.01, forbidden_ids=(3, 4, 5))
    tok = out.completion_ids[..., None]
    sampling = jnp.take_along_axis(jax.nn.log_softmax(processed), tok, -1)[..., 0]
    policy_lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok, -1)[..., 0]
    m = np.asarray(out.completion_mask)
    np.testing.assert_allclose(np.asarray(out.sampling_logprobs)[m], np.asarray(sampling)[m],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.policy_logprobs)[m], np.asarray(policy_lp)[m],
                               atol=1e-5)
    assert not np.isin(np.asarray(out.completion_ids)[m], [3, 4, 5]).any()
    # truncation renormalises: the sampled token is at least as likely as under the policy
    assert np.all(np.asarray(out.sampling_logprobs)[m] > np.asarray(out.policy_logprobs)[m])


@pytest.mark.parametrize("layout", ["repeat", "reprefill"])
def test_shared_prefix_and_naive_layouts_give_identical_rollouts(policy, prompts, layout):
    _, graphdef, params = policy
    ids, mask = prompts
    key = jax.random.key(3)
    shared = generate(graphdef, params, ids, mask, key=key, config=SAMPLED)
    naive = generate(graphdef, params, ids, mask, key=key,
                     config=SAMPLED.replace(prefix_cache=layout))
    np.testing.assert_array_equal(shared.completion_ids, naive.completion_ids)
    np.testing.assert_allclose(shared.sampling_logprobs, naive.sampling_logprobs, atol=1e-5)
    np.testing.assert_allclose(shared.policy_logprobs, naive.policy_logprobs, atol=1e-5)


def test_a_rows_samples_do_not_depend_on_the_rest_of_the_batch(policy, prompts):
    _, graphdef, params = policy
    ids, mask = prompts
    key = jax.random.key(4)
    full = generate(graphdef, params, ids, mask, key=key, config=SAMPLED)
    # prompt 1 among different neighbours, at another position of the batch
    other = np.array([[21, 22, 23, 24, 25], [7, 8, 0, 0, 0], [9, 9, 9, 0, 0]], np.int32)
    part = generate(graphdef, params, other, other > 0, key=key, config=SAMPLED,
                    prompt_index=np.array([1, 7, 8]))
    np.testing.assert_array_equal(part.completion_ids[:2], full.completion_ids[2:4])
    np.testing.assert_allclose(part.sampling_logprobs[:2], full.sampling_logprobs[2:4],
                               atol=1e-5)


def test_decode_donates_the_cache_and_the_sampling_state(policy, prompts):
    cfg, graphdef, params = policy
    ids, mask = prompts
    batch = prepare(ids, mask, SAMPLED, vocab_size=cfg.vocab_size)
    x = device_inputs(batch)
    key = jax.random.key(5)
    cache, state = prefill(graphdef, params, x["prompts"], x["prompt_mask"], key,
                           x["prompt_index"], x["forced"], x["forced_lengths"],
                           config=batch.config, mesh=None, data_axis="data")
    out, _ = decode(graphdef, params, cache, state, x["prompts"], x["prompt_mask"], key,
                    x["prompt_index"], x["forced"], x["forced_lengths"], jnp.int32(8),
                    config=batch.config, mesh=None, data_axis="data")
    buffers = cache.k + cache.v + cache.prefix_k + cache.prefix_v
    assert len(buffers) == 4 * cfg.num_layers and all(x.is_deleted() for x in buffers)
    assert state.tokens.is_deleted()
    assert int(out.decode_steps) == 8


def _instructions(hlo: str, shape: str) -> list[str]:
    """Opcodes of the HLO instructions (fusions by name) whose result is ``shape``."""
    pat = r"%(\S+) = " + re.escape(shape) + r"\{[^}]*\} ([\w-]+)\("
    return [op if op != "fusion" else name for name, op in re.findall(pat, hlo)]


def test_prefill_and_the_decode_loop_neither_copy_nor_transpose_the_cache(policy, prompts):
    """The per-row buffers (keys [B, K, Dh, T], values [B, K, T, Dh]) are written once by
    prefill (no shared zero broadcast copied into each) and updated in place by every
    decode step: no copy of a buffer, no slot-major [B, T, K, Dh] transpose, no stacked
    [L, ...] cache."""
    cfg, graphdef, params = policy
    ids, mask = prompts
    batch = prepare(ids, mask, SAMPLED, vocab_size=cfg.vocab_size)
    x = device_inputs(batch)
    args = (x["prompts"], x["prompt_mask"], jax.random.key(6), x["prompt_index"],
            x["forced"], x["forced_lengths"])
    static = dict(config=batch.config, mesh=None, data_axis="data")
    cache, state = prefill(graphdef, params, *args, **static)
    b, t, k, dh = 6, batch.config.max_new_tokens, cfg.num_kv_heads, cfg.head_dim
    assert cache.k[0].shape == (b, k, dh, t) and cache.v[0].shape == (b, k, t, dh)
    layers = (f"f32[{b},{k},{dh},{t}]", f"f32[{b},{k},{t},{dh}]")
    others = (f"f32[{b},{t},{k},{dh}]",
              *(f"f32[{cfg.num_layers},{x[4:]}" for x in layers))
    hlo_prefill = prefill.lower(graphdef, params, *args, **static).compile().as_text()
    hlo_decode = decode.lower(graphdef, params, cache, state, *args[:2], args[2], *args[3:],
                              jnp.int32(8), **static).compile().as_text()
    for hlo in (hlo_prefill, hlo_decode):
        for layer in layers:
            ops = _instructions(hlo, layer)
            assert not [op for op in ops if "copy" in op or "transpose" in op], ops
        for other in others:
            assert not _instructions(hlo, other), other


def test_generate_reuses_the_previous_calls_cache_memory_on_cpu(policy, prompts):
    """The decode's per-row buffers are held and donated to the next prefill of the
    same shapes: same rollout as from fresh buffers, prefill compiled once."""
    from rlx.sampling import recycle
    cfg, graphdef, params = policy
    ids, mask = prompts
    key = jax.random.key(7)
    recycle.clear()
    first = generate(graphdef, params, ids, mask, key=key, config=SAMPLED)
    (entry,) = recycle._held.values()
    held = entry[1]
    assert len(held) == 2 * cfg.num_layers and not any(x.is_deleted() for x in held)
    compiled = prefill._cache_size()
    second = generate(graphdef, params, ids, mask, key=key, config=SAMPLED)
    assert all(x.is_deleted() for x in held)          # donated to the second prefill
    assert prefill._cache_size() == compiled
    recycle.clear()
    third = generate(graphdef, params, ids, mask, key=key, config=SAMPLED)
    for out in (second, third):
        np.testing.assert_array_equal(out.completion_ids, first.completion_ids)
        np.testing.assert_array_equal(out.sampling_logprobs, first.sampling_logprobs)
        np.testing.assert_array_equal(out.policy_logprobs, first.policy_logprobs)
    recycle.clear()
    assert not recycle._held
