"""The update phase of one RL iteration as one compiled program.

    rollout arrays ──► old / reference log-probs, critic values (forwards, no grad)
                   ──► RewardBatch (rewards, components, KL for the reward path, ...)
                   ──► objective.advantages ──► PolicyBatch
                   ──► scan over epochs × scan over minibatches:
                           policy step (+ critic step) with exact micro-batching
                   ──► metrics reduced over every optimizer step

``update(state, critic_state, ref_params, batch) -> (state, critic_state, metrics)``
is jitted once per batch shape (prompt bucket × completion bucket); nothing returns
to the host between the forwards and the last optimizer step.

Minibatches: minibatch m of M holds the prompts {m, m+M, m+2M, …} with their G rows
(whole groups, every minibatch spread over all data-parallel devices).

Skipped old-policy forward: when the iteration makes exactly one optimizer step on its
own samples (epochs = minibatches = 1) the behaviour log-probs equal the current ones,
so the step uses ``old_logp = stop_gradient(logp)`` of its own forward (ratio ≡ 1)
instead of a separate pass. A separate pass is still traced when the reward path
reads ``RewardBatch.kl``; XLA drops it when nothing reads it.

Temperature: the trainer's log-probs divide the logits by ``temperature`` (the
sampling temperature by default, ``RLConfig.logprob_temperature``), so they are the
log-probs of the distribution the sampler drew from (before top-k/top-p truncation);
the first on-policy ratio is then 1 at any τ.

Shapes: P prompts, G group size, B = P·G rows, T completion bucket, K reward
components.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from rlx import sharding as sh
from rlx.objectives.kl import kl_reward_penalty
from rlx.objectives.types import Objective, PolicyBatch, RewardBatch
from rlx.train import steps as steps_lib
from rlx.train.batches import PackedRolloutBatch, RolloutBatch
from rlx.train.packing import PackedSequences

sg = jax.lax.stop_gradient

# metrics whose value after the last optimizer step is logged too (``<name>/last``)
LAST_METRICS = ("loss", "grad_norm", "loss/total", "ratio/mean", "kl/mean")


@struct.dataclass
class IterationBatch:
    """Everything the rollout phase hands to the update (device arrays).

    seq: ``Sequences`` [B, Sp+T] (naive layout) or ``PackedSequences`` [P, S] (shared
      prefix layout).
    rewards: [B] weighted total reward of each row (row b = p·G + g).
    components: [B, K] per-component rewards.
    mask: [B, T] bool loss mask: completion tokens that were sampled (not forced).
    tokens: [B, T] completion ids. lengths: [B]. finished / truncated: [B] bool.
    forced: [B, T] bool forced-prefix tokens.
    sampler_logp: [B, T] log-probs the sampler drew each token with (after its
      temperature and truncation; 0 on forced and masked tokens).
    group_ids: [B] prompt index of each row.
    """

    seq: Any
    rewards: jax.Array
    components: jax.Array
    mask: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    finished: jax.Array
    truncated: jax.Array
    forced: jax.Array
    sampler_logp: jax.Array
    group_ids: jax.Array


@struct.dataclass
class CriticSpec:
    """The static half of a separately trained critic: its graph, optimizer and the
    value-clipping ε of its clipped value loss."""

    graphdef: Any = struct.field(pytree_node=False)
    tx: Any = struct.field(pytree_node=False)
    clip_eps: float | None = struct.field(pytree_node=False, default=0.2)


def _stack_minibatches(tree, num_prompts: int, minibatches: int):
    """[P·u, ...] leaves -> [M, (P/M)·u, ...]: minibatch m holds prompts m, m+M, …"""
    def split(x):
        rows = x.shape[0]
        u = rows // num_prompts
        x = x.reshape(num_prompts // minibatches, minibatches, u, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape(minibatches, (num_prompts // minibatches) * u, *x.shape[3:])
    return jax.tree.map(split, tree)


def _reduce(stacked: dict, steps: int) -> dict:
    """Metrics stacked over [E, M] optimizer steps -> scalars: min of ``*min*`` names,
    max of ``*max*`` names, mean of the rest (``steps._combine_metrics``);
    ``<name>/last`` for ``LAST_METRICS``."""
    flat = {name: v.reshape(-1) for name, v in stacked.items()}
    out = steps_lib._combine_metrics(flat)
    out.update({f"{name}/last": flat[name][-1] for name in LAST_METRICS if name in flat})
    out["update/optimizer_steps"] = jnp.asarray(steps, jnp.float32)
    return out


def make_update(graphdef, tx, objective: Objective, *, num_generations: int,
                epochs: int = 1, minibatches: int = 1, microbatches: int = 1,
                temperature: float = 1.0, reuse_logp: bool | None = None,
                critic: CriticSpec | None = None, mesh=None, chunk_size: int = 512,
                shard_map: bool = True):
    """Builds ``update(state, critic_state, ref_params, batch)`` (not yet jitted).

    reuse_logp: None = automatic (skip the old-policy forward exactly when
    epochs·minibatches = 1); False forces the separate pass (the two-pass path).
    shard_map: compute each step's gradients under ``shard_map`` over the batch axes
    of ``mesh`` with explicit psums (``steps.sharded_gradients``); False leaves the
    partitioning of the whole step to the compiler (plain ``jit``). Both give the same
    result; token selections that rank over "the batch" (forking tokens, D³S tokens)
    rank per device under shard_map.
    """
    if epochs < 1 or minibatches < 1 or microbatches < 1:
        raise ValueError(f"epochs={epochs}, minibatches={minibatches}, "
                         f"microbatches={microbatches}: each must be >= 1")
    single = epochs * minibatches == 1
    if reuse_logp is None:
        reuse_logp = single
    if reuse_logp and not single:
        raise ValueError("reuse_logp=True needs exactly one optimizer step per iteration "
                         f"(epochs={epochs}, minibatches={minibatches})")
    g = num_generations
    policy_step = steps_lib.make_policy_step(graphdef, tx, objective,
                                             num_microbatches=microbatches,
                                             temperature=temperature, chunk_size=chunk_size,
                                             reuse_logp=reuse_logp,
                                             mesh=mesh if shard_map else None,
                                             data_axes=sh.BATCH_AXES if shard_map else None)
    value_step = (steps_lib.make_value_step(critic.graphdef, critic.tx,
                                            clip_eps=critic.clip_eps,
                                            num_microbatches=microbatches)
                  if critic is not None else None)

    def constrain(tree):
        if mesh is None:
            return tree
        def one(x):
            spec = PartitionSpec(None, sh.BATCH_AXES, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return jax.tree.map(one, tree)

    def update(state, critic_state, ref_params, batch: IterationBatch):
        b, t = batch.mask.shape
        if b % g:
            raise ValueError(f"{b} rows are not a multiple of G={g}")
        p = b // g
        if p % minibatches:
            raise ValueError(f"{p} prompts per iteration not divisible by "
                             f"minibatches={minibatches}")
        mask = batch.mask.astype(jnp.float32)
        packed = isinstance(batch.seq, PackedSequences)

        def forward(params):
            return steps_lib.token_outputs(graphdef, params, batch.seq, t,
                                           temperature=temperature, chunk_size=chunk_size)

        old = jax.tree.map(sg, forward(state.params))       # dropped by XLA if unread
        ref_logp = sg(forward(ref_params).logp) if ref_params is not None else None
        values = (sg(steps_lib.token_values(critic.graphdef, critic_state.params, batch.seq, t))
                  if critic is not None else None)
        kl = (kl_reward_penalty(old.logp, ref_logp, mask, coef=1.0)
              if ref_logp is not None else None)
        rb = RewardBatch(rewards=batch.rewards.reshape(p, g), mask=mask,
                         lengths=batch.lengths, values=values, kl=kl,
                         components=batch.components.reshape(p, g, -1),
                         tokens=batch.tokens, finished=batch.finished,
                         truncated=batch.truncated, forced=batch.forced,
                         state=state.objective_state)
        adv = objective.advantages(rb)
        if adv.state is not None:
            state = state.replace(objective_state=adv.state)
        pb = PolicyBatch(mask=adv.mask,
                         old_logp=jnp.zeros_like(mask) if reuse_logp else old.logp,
                         advantages=adv.advantages, ref_logp=ref_logp,
                         sampler_logp=batch.sampler_logp, old_values=values,
                         returns=adv.returns, group_ids=batch.group_ids)
        full = (PackedRolloutBatch.create(batch.seq, pb) if packed
                else RolloutBatch(seq=batch.seq, policy=pb))
        stacked = constrain(_stack_minibatches(full, p, minibatches))

        def minibatch_step(carry, mb):
            st, cst = carry
            st, m = policy_step(st, mb)
            if value_step is not None:
                cst, vm = value_step(cst, mb)
                m = {**m, **vm}
            return (st, cst), m

        def epoch(carry, _):
            return jax.lax.scan(minibatch_step, carry, stacked)

        (state, critic_state), per_step = jax.lax.scan(epoch, (state, critic_state), None,
                                                       length=epochs)
        metrics = {**_reduce(per_step, epochs * minibatches), **adv.metrics}
        if ref_logp is not None and not reuse_logp:
            den = jnp.maximum(mask.sum(), 1.0)
            metrics["kl/ref"] = jnp.sum((old.logp - ref_logp) * mask) / den
        if values is not None:
            metrics["critic/old_value_mean"] = jnp.sum(values * mask) / jnp.maximum(
                mask.sum(), 1.0)
        return state, critic_state, metrics

    return update


def jit_update(update, mesh, state_shardings, critic_shardings, ref_shardings, batch_example):
    """jit with explicit shardings: rows of the batch over the batch axes, the state
    (and critic state) in their parameter layouts and donated."""
    batch_sh = jax.tree.map(
        lambda x: sh.replicated(mesh) if jnp.ndim(x) == 0 else sh.batch_sharding(mesh, jnp.ndim(x)),
        batch_example)
    return jax.jit(update,
                   in_shardings=(state_shardings, critic_shardings, ref_shardings, batch_sh),
                   out_shardings=(state_shardings, critic_shardings, sh.replicated(mesh)),
                   donate_argnums=(0, 1))
