"""Stop tokens, early exit, max length, forced prefixes, empty and over-long prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.models import api
from rlx.sampling import SamplerConfig, decode, generate

EVEN = tuple(range(0, 512, 2))
STOP = SamplerConfig(max_new_tokens=40, num_generations=2, stop_token_ids=EVEN)
GREEDY = SamplerConfig(max_new_tokens=8, temperature=0.0, return_policy_logprobs=True)
SAMPLED = SamplerConfig(max_new_tokens=8, num_generations=2, return_policy_logprobs=True)


def test_a_stop_token_ends_its_row_and_is_part_of_the_completion(policy, prompts):
    _, graphdef, params = policy
    ids, mask = prompts
    out = generate(graphdef, params, ids, mask, key=jax.random.key(0), config=STOP)
    tokens = np.asarray(out.completion_ids)
    for b in range(6):
        first_stop = int(np.flatnonzero(np.isin(tokens[b], EVEN))[0])
        assert out.lengths[b] == first_stop + 1
        np.testing.assert_array_equal(out.completion_mask[b], np.arange(64) <= first_stop)
        np.testing.assert_array_equal(tokens[b, first_stop + 1:], STOP.pad_id)
        np.testing.assert_array_equal(out.sampling_logprobs[b, first_stop + 1:], 0.0)
        assert np.all(np.asarray(out.sampling_logprobs[b, :first_stop + 1]) < 0)
    assert bool(jnp.all(out.finished)) and not bool(jnp.any(out.truncated))
    # early exit: the loop ran only as long as the longest row
    assert int(out.decode_steps) == int(jnp.max(out.lengths)) < 40


def test_max_new_tokens_truncates_without_recompiling_inside_a_bucket(policy, prompts):
    _, graphdef, params = policy
    ids, mask = prompts
    generate(graphdef, params, ids, mask, key=jax.random.key(1), config=SAMPLED)
    compiled = decode._cache_size()
    out = generate(graphdef, params, ids, mask, key=jax.random.key(1),
                   config=SAMPLED.replace(max_new_tokens=5))
    assert decode._cache_size() == compiled
    assert out.completion_ids.shape == (6, 16)
    np.testing.assert_array_equal(out.lengths, 5)
    np.testing.assert_array_equal(out.completion_mask, np.tile(np.arange(16) < 5, (6, 1)))
    np.testing.assert_array_equal(np.asarray(out.completion_ids)[:, 5:], 0)
    assert bool(jnp.all(out.truncated)) and not bool(jnp.any(out.finished))
    assert int(out.decode_steps) == 5


def test_forced_prefix_is_fed_marked_and_then_continued(policy, prompts):
    _, graphdef, params = policy
    ids, mask = prompts
    forced = np.array([[100, 101, 102], [200, 201, 0], [0, 0, 0]], np.int32)
    flen = np.array([3, 2, 0])
    out = generate(graphdef, params, ids, mask, key=jax.random.key(2), config=GREEDY,
                   forced_prefix=forced, forced_lengths=flen)
    np.testing.assert_array_equal(out.forced, np.arange(16)[None] < flen[:, None])
    np.testing.assert_array_equal(out.loss_mask, (np.arange(16)[None] >= flen[:, None])
                                  & (np.arange(16)[None] < 8))
    for b in range(3):
        np.testing.assert_array_equal(out.completion_ids[b, :flen[b]], forced[b, :flen[b]])
    np.testing.assert_array_equal(np.asarray(out.sampling_logprobs)[np.asarray(out.forced)], 0)
    # policy log-probs of the forced tokens come from the model (teacher-forced check)
    tokens, attn, positions = out.sequences()
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    logp = jax.jit(lambda *a: api.token_logprobs(graphdef, params, *a)[0])(
        tokens, targets, positions, attn)
    sp = out.prompt_ids.shape[1]
    want = np.where(out.completion_mask, logp[:, sp - 1: sp + 15], 0.0)
    np.testing.assert_allclose(out.policy_logprobs, want, atol=1e-5)
    # the greedy continuation equals greedy decoding of prompt + forced tokens
    ext = np.zeros((3, 8), np.int32)
    lengths = mask.sum(1)
    for b in range(3):
        row = np.concatenate([ids[b][mask[b]], forced[b, :flen[b]]])
        ext[b, :row.size] = row
    ref = generate(graphdef, params, ext, ext > 0, key=jax.random.key(2), config=GREEDY)
    for b in range(3):
        np.testing.assert_array_equal(out.completion_ids[b, flen[b]:8],
                                      ref.completion_ids[b, :8 - flen[b]])
    assert (lengths + flen <= 8).all()


def test_forced_stop_tokens_do_not_end_a_row(policy, prompts):
    _, graphdef, params = policy
    ids, mask = prompts
    forced = np.tile(np.array([[2, 4]], np.int32), (6, 1))
    out = generate(graphdef, params, ids, mask, key=jax.random.key(3), config=STOP,
                   forced_prefix=forced)
    assert bool(jnp.all(out.lengths >= 3))
    np.testing.assert_array_equal(out.completion_ids[:, :2], forced)
    assert bool(jnp.all(out.finished))


@pytest.mark.parametrize("kwargs,match", [
    (dict(forced_prefix=np.zeros((3, 9), np.int32)), "more than max_new_tokens=8"),
    (dict(forced_prefix=np.zeros((2, 2), np.int32)), r"expected \[P·G, F\]"),
    (dict(forced_prefix=np.zeros((3, 2), np.int32), forced_lengths=np.array([3, 0, 0])),
     "forced_lengths"),
])
def test_bad_forced_prefixes_raise(policy, prompts, kwargs, match):
    _, graphdef, params = policy
    ids, mask = prompts
    with pytest.raises(ValueError, match=match):
        generate(graphdef, params, ids, mask, key=jax.random.key(0), config=GREEDY, **kwargs)


def test_an_empty_prompt_is_rejected(policy, prompts):
    _, graphdef, params = policy
    ids, mask = prompts
    mask = mask.copy()
    mask[1] = False
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate(graphdef, params, ids, mask, key=jax.random.key(0), config=GREEDY)


def test_an_overlong_prompt_raises_or_is_truncated_on_the_left(policy):
    _, graphdef, params = policy
    long = np.arange(1, 11, dtype=np.int32)[None]
    config = SamplerConfig(max_new_tokens=4, temperature=0.0, prompt_buckets=(4, 8))
    with pytest.raises(ValueError, match="more than the largest prompt bucket 8"):
        generate(graphdef, params, long, long > 0, key=jax.random.key(0), config=config)
    config = config.replace(overlong_prompt="truncate_left")
    cut = generate(graphdef, params, long, long > 0, key=jax.random.key(0), config=config)
    tail = generate(graphdef, params, long[:, 2:], long[:, 2:] > 0, key=jax.random.key(0),
                    config=config)
    np.testing.assert_array_equal(cut.prompt_ids, [list(range(3, 11))])
    np.testing.assert_array_equal(cut.completion_ids, tail.completion_ids)
