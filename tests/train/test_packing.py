"""Shared-prefix (Prefix Grouper) update layout equals the naive layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlx.models import api, config
from rlx.objectives import presets
from rlx.objectives.types import PolicyBatch
from rlx.train import packing, state as st, steps
from rlx.train.batches import PackedRolloutBatch, RolloutBatch, make_sequences

CFG = config.model_config("tiny", vocab_size=64)
P, G, SP, T = 2, 3, 6, 5


def _rollout(seed=0):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(1, 64, (P * G, SP))
    pmask = np.ones((P * G, SP), bool)
    pmask[:G, :2] = False                                  # prompt 0 is shorter (left pad)
    prompts = np.repeat(prompts[::G], G, axis=0)            # rows of a group share a prompt
    lens = rng.integers(1, T + 1, P * G)
    cmask = np.arange(T)[None, :] < lens[:, None]
    comps = np.where(cmask, rng.integers(1, 64, (P * G, T)), 0)
    return prompts, pmask, comps, cmask


def _naive_seq(prompts, pmask, comps, cmask):
    return make_sequences(np.concatenate([prompts, comps], 1), np.concatenate([pmask, cmask], 1))


def test_packed_logprobs_equal_naive_rows():
    graphdef, params = api.init(CFG, seed=0)
    prompts, pmask, comps, cmask = _rollout()
    naive = steps.completion_outputs(graphdef, params, _naive_seq(prompts, pmask, comps, cmask), T)
    packed = packing.pack_groups(prompts, pmask, comps, cmask, G)
    assert packed.tokens.shape == (P, SP + G * T)
    got = packing.packed_completion_outputs(graphdef, params, packed)
    m = cmask
    np.testing.assert_allclose(np.asarray(got.logp)[m], np.asarray(naive.logp)[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.entropy)[m], np.asarray(naive.entropy)[m], atol=1e-5)


@pytest.mark.parametrize("micro", [1, 2])
def test_policy_step_in_shared_prefix_layout_equals_naive(micro):
    graphdef, params = api.init(CFG, seed=1)
    prompts, pmask, comps, cmask = _rollout(1)
    rng = np.random.default_rng(2)
    mask = jnp.asarray(cmask, jnp.float32)
    policy = PolicyBatch(mask=mask, old_logp=jnp.asarray(-rng.uniform(1, 4, (P * G, T))) * mask,
                         advantages=jnp.asarray(rng.normal(size=(P * G, 1)), jnp.float32) * mask)
    tx = optax.sgd(0.1)
    objective = presets.grpo(kl_coef=0.0)
    state = st.create(params, tx, objective_state=objective.init())
    step = jax.jit(steps.make_policy_step(graphdef, tx, objective, num_microbatches=micro))
    naive = RolloutBatch(seq=_naive_seq(prompts, pmask, comps, cmask), policy=policy)
    packed = PackedRolloutBatch.create(packing.pack_groups(prompts, pmask, comps, cmask, G), policy)
    s1, m1 = step(jax.tree.map(jnp.copy, state), naive)
    s2, m2 = step(jax.tree.map(jnp.copy, state), packed)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5, abs=1e-7)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.params, s2.params)
    assert max(jax.tree.leaves(diffs)) < 1e-6


def test_pack_rejects_rows_not_divisible_by_group():
    prompts, pmask, comps, cmask = _rollout()
    with pytest.raises(ValueError, match="not divisible by group size 4"):
        packing.pack_groups(prompts, pmask, comps, cmask, 4)
