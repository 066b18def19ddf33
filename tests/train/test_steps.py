"""Update steps: exact micro-batching, learning signal, shapes of every role's step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlx import sharding as sh
from rlx.models import api, config
from rlx.objectives import presets
from rlx.objectives.types import PolicyBatch
from rlx.train import optim, state as st, steps
from rlx.train.batches import PairBatch, RolloutBatch, SFTBatch, make_sequences

CFG = config.model_config("tiny", vocab_size=64)


def _sft_batch(rows=8, width=12, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, CFG.vocab_size, (rows, width))
    mask = np.ones((rows, width), bool)
    mask[:2, -3:] = False                      # right padding on two rows
    loss = np.zeros((rows, width), np.float32)
    loss[:, 6:] = 1.0
    loss[~mask] = 0.0
    return SFTBatch(seq=make_sequences(toks, mask), loss_mask=jnp.asarray(loss))


def _rollout_batch(rows=8, sp=5, t=6, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, CFG.vocab_size, (rows, sp + t))
    mask = np.ones((rows, sp + t), bool)
    mask[:3, :2] = False                       # left-padded prompts
    mask[4:, -2:] = False                      # short completions
    cmask = jnp.asarray(mask[:, sp:], jnp.float32)
    pb = PolicyBatch(mask=cmask,
                     old_logp=jnp.asarray(-rng.uniform(1, 5, (rows, t)), jnp.float32) * cmask,
                     advantages=jnp.asarray(rng.normal(size=(rows, 1)) * np.ones((1, t)),
                                            jnp.float32) * cmask,
                     group_ids=jnp.arange(rows) // 4)
    return RolloutBatch(seq=make_sequences(toks, mask), policy=pb)


def _sgd_state(seed=0):
    graphdef, params = api.init(CFG, seed=seed)
    tx = optax.sgd(0.1)
    return graphdef, tx, st.create(params, tx, seed=seed)


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def test_microbatched_sft_gradient_equals_full_batch():
    graphdef, tx, state = _sgd_state()
    batch = _sft_batch()
    one = jax.jit(steps.make_sft_step(graphdef, tx))
    four = jax.jit(steps.make_sft_step(graphdef, tx, num_microbatches=4))
    s1, m1 = one(jax.tree.map(jnp.copy, state), batch)
    s4, m4 = four(jax.tree.map(jnp.copy, state), batch)
    assert float(m1["sft_loss"]) == pytest.approx(float(m4["sft_loss"]), rel=1e-5)
    assert _max_diff(s1.params, s4.params) < 1e-6


def test_microbatched_policy_gradient_equals_full_batch_for_seq_mean_aggregation():
    graphdef, tx, state = _sgd_state()
    objective = presets.grpo(kl_coef=0.0)            # seq-mean-token-mean aggregation
    state = state.replace(objective_state=objective.init())
    batch = _rollout_batch()
    s1, m1 = jax.jit(steps.make_policy_step(graphdef, tx, objective))(
        jax.tree.map(jnp.copy, state), batch)
    s2, m2 = jax.jit(steps.make_policy_step(graphdef, tx, objective, num_microbatches=2))(
        jax.tree.map(jnp.copy, state), batch)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5, abs=1e-7)
    assert _max_diff(s1.params, s2.params) < 1e-6
    assert int(s1.step) == 1


def test_sft_step_reduces_loss_on_a_fixed_batch():
    graphdef, params = api.init(CFG, seed=1)
    tx = optim.optimizer(learning_rate=3e-3)
    state = st.create(params, tx)
    batch = _sft_batch(seed=3)
    step = jax.jit(steps.make_sft_step(graphdef, tx), donate_argnums=0)
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["sft_loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert np.all(np.isfinite(losses))


def test_policy_step_raises_logprob_of_positive_advantage_tokens():
    graphdef, tx, state = _sgd_state(seed=2)
    objective = presets.grpo(kl_coef=0.0)
    state = state.replace(objective_state=objective.init())
    batch = _rollout_batch(seed=4)
    t = batch.completion_length
    logp0 = steps.completion_outputs(graphdef, state.params, batch.seq, t).logp
    batch = batch.replace(policy=batch.policy.replace(old_logp=logp0))   # on-policy
    new, _ = jax.jit(steps.make_policy_step(graphdef, tx, objective))(state, batch)
    logp1 = steps.completion_outputs(graphdef, new.params, batch.seq, t).logp
    m = np.asarray(batch.policy.mask) > 0
    adv = np.asarray(batch.policy.advantages)
    delta = np.asarray(logp1 - logp0)
    assert (delta[m & (adv > 0)]).mean() > 0 > (delta[m & (adv < 0)]).mean()


def test_completion_outputs_match_full_forward_logprobs():
    graphdef, params = api.init(CFG, seed=0)
    batch = _rollout_batch()
    seq, t = batch.seq, batch.completion_length
    out = steps.completion_outputs(graphdef, params, seq, t)
    logits = api.logits(graphdef, params, seq.tokens, seq.positions, seq.attention_mask)
    logp = jax.nn.log_softmax(logits, -1)
    sp = seq.tokens.shape[1] - t
    ref = jnp.take_along_axis(logp[:, sp - 1:-1], seq.tokens[:, sp:, None], -1)[..., 0]
    np.testing.assert_allclose(out.logp, ref, atol=1e-5)
    assert out.entropy.shape == (seq.tokens.shape[0], t)


def test_value_step_moves_values_towards_returns():
    cfg = CFG
    graphdef, params = api.init(cfg, kind="value", seed=0)
    tx = optax.adam(1e-2)
    state = st.create(params, tx)
    batch = _rollout_batch()
    ones = jnp.ones_like(batch.policy.mask)
    batch = batch.replace(policy=batch.policy.replace(returns=ones, old_values=0 * ones))
    step = jax.jit(steps.make_value_step(graphdef, tx, clip_eps=None))
    losses = []
    for _ in range(10):
        state, m = step(state, batch)
        losses.append(float(m["value_loss"]))
    assert losses[-1] < losses[0]


def test_reward_model_and_dpo_steps_learn_a_preference():
    rng = np.random.default_rng(0)
    rows, width = 4, 8
    chosen = rng.integers(0, CFG.vocab_size, (rows, width))
    rejected = rng.integers(0, CFG.vocab_size, (rows, width))
    ones = np.ones((rows, width), bool)
    resp = np.zeros((rows, width), np.float32)
    resp[:, 4:] = 1
    pair = PairBatch(chosen=make_sequences(chosen, ones), rejected=make_sequences(rejected, ones),
                     chosen_mask=jnp.asarray(resp), rejected_mask=jnp.asarray(resp),
                     ref_chosen_logp=jnp.zeros(rows), ref_rejected_logp=jnp.zeros(rows))
    g_rm, p_rm = api.init(CFG, kind="reward", seed=0)
    tx = optax.adam(1e-2)
    rm_state = st.create(p_rm, tx)
    rm_step = jax.jit(steps.make_reward_model_step(g_rm, tx))
    g_pol, p_pol = api.init(CFG, seed=0)
    graphdef_state = st.create(p_pol, tx)
    dpo_step = jax.jit(steps.make_preference_step(g_pol, tx, loss="dpo", beta=0.5))
    for _ in range(8):
        rm_state, rm_m = rm_step(rm_state, pair)
        graphdef_state, dpo_m = dpo_step(graphdef_state, pair)
    assert float(rm_m["rm_accuracy"]) == 1.0
    assert float(dpo_m["pref_accuracy"]) == 1.0


def test_unknown_preference_loss_is_rejected():
    graphdef, tx, _ = _sgd_state()
    with pytest.raises(ValueError, match="preference loss 'kto'"):
        steps.make_preference_step(graphdef, tx, loss="kto")


def test_microbatches_must_divide_rows():
    graphdef, tx, state = _sgd_state()
    with pytest.raises(ValueError, match="not divisible by num_microbatches=3"):
        jax.jit(steps.make_sft_step(graphdef, tx, num_microbatches=3))(state, _sft_batch())


def test_jit_step_keeps_state_sharding_on_a_one_device_mesh():
    graphdef, tx, state = _sgd_state()
    mesh = sh.make_mesh()
    shardings = sh.state_shardings(state, mesh)
    state = sh.place(state, shardings)
    batch = sh.shard_batch(_sft_batch(), mesh)
    fn = steps.jit_step(steps.make_sft_step(graphdef, tx), mesh, shardings, batch)
    new, metrics = fn(state, batch)
    assert new.params["trunk"]["embed"]["embedding"].value.sharding == \
        shardings.params["trunk"]["embed"]["embedding"].value
    assert np.isfinite(float(metrics["sft_loss"]))


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_every_preference_loss_runs_and_is_finite(loss):
    rng = np.random.default_rng(1)
    ones = np.ones((2, 6), bool)
    resp = np.zeros((2, 6), np.float32)
    resp[:, 3:] = 1
    pair = PairBatch(chosen=make_sequences(rng.integers(0, 64, (2, 6)), ones),
                     rejected=make_sequences(rng.integers(0, 64, (2, 6)), ones),
                     chosen_mask=jnp.asarray(resp), rejected_mask=jnp.asarray(resp),
                     ref_chosen_logp=jnp.zeros(2), ref_rejected_logp=jnp.zeros(2))
    graphdef, params = api.init(CFG, seed=0)
    tx = optax.sgd(0.1)
    _, m = jax.jit(steps.make_preference_step(graphdef, tx, loss=loss, beta=0.5))(
        st.create(params, tx), pair)
    assert np.isfinite(float(m["pref_loss"]))


def test_sft_step_is_invariant_to_extra_right_padding():
    """The experiment pads SFT batches to a multiple of 16 tokens; padding must not
    change the loss or the update."""
    graphdef, tx, state = _sgd_state(seed=5)
    batch = _sft_batch(seed=6)
    rows, width = batch.seq.tokens.shape
    pad = 20
    toks = jnp.concatenate([batch.seq.tokens, jnp.full((rows, pad), 7, jnp.int32)], axis=1)
    mask = jnp.concatenate([batch.seq.attention_mask, jnp.zeros((rows, pad), bool)], axis=1)
    loss = jnp.concatenate([batch.loss_mask, jnp.zeros((rows, pad))], axis=1)
    padded = SFTBatch(seq=make_sequences(toks, mask), loss_mask=loss)
    step = jax.jit(steps.make_sft_step(graphdef, tx))
    s1, m1 = step(jax.tree.map(jnp.copy, state), batch)
    s2, m2 = step(jax.tree.map(jnp.copy, state), padded)
    assert float(m1["sft_loss"]) == pytest.approx(float(m2["sft_loss"]), rel=1e-5)
    assert _max_diff(s1.params, s2.params) < 1e-6
