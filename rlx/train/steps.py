"""Pure, jit-compiled update steps: ``step(state, batch) -> (state, metrics)``.

Every step differentiates a *numerator* and divides by a parameter-independent
*denominator* (see ``rlx/objectives/types.py``): with M micro-batches the gradient is
Σ_m ∇num_m / Σ_m den_m, exactly the full-batch gradient of the aggregated loss.
Micro-batch m takes the strided rows {m, m+M, m+2M, …} so every micro-batch spans
all data-parallel devices.

Mixed precision: parameters (and optimizer moments) stay in ``param_dtype`` (f32
master weights); the model computes in ``ModelConfig.dtype`` (e.g. bf16).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rlx.models import api
from rlx.models.logprobs import logprobs_from_hidden
from rlx.objectives import preference
from rlx.objectives.types import Objective, TokenOutputs
from rlx.objectives.value import clipped_value_loss
from rlx.train.batches import PackedRolloutBatch, PairBatch, RolloutBatch, Sequences, SFTBatch
from rlx.train.state import TrainState

LossFn = Callable[[Any, Any], tuple[jax.Array, tuple[jax.Array, dict]]]


# ----------------------------------------------------------------------------- forwards
def completion_outputs(graphdef, params, seq: Sequences, completion_length: int, *,
                       temperature: float = 1.0, chunk_size: int = 512) -> TokenOutputs:
    """Log-probs and entropies of the last T tokens of each row, [B, T] f32.

    Hidden state t predicts token t+1, so completion token j (at index Sp + j) is
    scored from hidden index Sp + j − 1; only those T positions are unembedded.
    """
    model = api.merge(graphdef, params)
    hidden, _ = model(seq.tokens, seq.positions, seq.attention_mask)
    s = seq.tokens.shape[1]
    sp = s - completion_length
    if sp < 1:
        raise ValueError(f"completion_length={completion_length} leaves no prompt token in "
                         f"sequences of length {s}")
    logp, entropy = logprobs_from_hidden(hidden[:, sp - 1:s - 1], model.unembedding(),
                                         seq.tokens[:, sp:], temperature=temperature,
                                         chunk_size=chunk_size)
    return TokenOutputs(logp=logp, entropy=entropy)


def token_outputs(graphdef, params, seq, completion_length: int | None = None, *,
                  temperature: float = 1.0, chunk_size: int = 512) -> TokenOutputs:
    """The one teacher-forced forward every caller uses: per-token log-probs and
    entropies [B, T] f32 of the completions, in either layout.

    ``seq`` is ``Sequences`` (naive layout: B rows ``[prompt | completion]``, the last
    ``completion_length`` tokens scored) or ``packing.PackedSequences`` (one row per
    prompt, Prefix Grouper layout; T is read from it). ``temperature`` divides the
    logits (log-probs of the distribution the sampler drew from, before truncation).
    """
    from rlx.train.packing import PackedSequences, packed_completion_outputs

    if isinstance(seq, PackedSequences):
        return packed_completion_outputs(graphdef, params, seq, temperature=temperature,
                                         chunk_size=chunk_size)
    if completion_length is None:
        raise ValueError("token_outputs: completion_length is required for Sequences")
    return completion_outputs(graphdef, params, seq, completion_length,
                              temperature=temperature, chunk_size=chunk_size)


def token_values(graphdef, params, seq, completion_length: int | None = None) -> jax.Array:
    """Critic values V(s) before each completion token, [B, T] f32, in either layout."""
    from rlx.train.packing import PackedSequences, packed_completion_values

    if isinstance(seq, PackedSequences):
        return packed_completion_values(graphdef, params, seq)
    return completion_values(graphdef, params, seq, completion_length)


def completion_values(graphdef, params, seq: Sequences, completion_length: int) -> jax.Array:
    """Critic values V(s_j) of the state before each completion token, [B, T] f32."""
    values = api.values(graphdef, params, seq.tokens, seq.positions, seq.attention_mask)
    s = seq.tokens.shape[1]
    sp = s - completion_length
    return values[:, sp - 1:s - 1]


def sequence_logprob(graphdef, params, seq: Sequences, target_mask) -> jax.Array:
    """Σ_t log π(tokens_t | tokens_<t) over target_mask [B,S] -> [B] (t ≥ 1)."""
    out = token_outputs(graphdef, params, seq, seq.tokens.shape[1] - 1)
    return jnp.sum(out.logp * target_mask[:, 1:], axis=1)


# ------------------------------------------------------------------- gradient machinery
def _microbatches(batch, num: int):
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"batch rows {x.shape[0]} not divisible by "
                             f"num_microbatches={num}")
        x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def _combine_metrics(stacked: dict) -> dict:
    """Stacked per-step metrics -> scalars: min of ``*min*``, max of ``*max*``, mean of the rest."""
    out = {}
    for name, value in stacked.items():
        if "min" in name:
            out[name] = jnp.min(value)
        elif "max" in name:
            out[name] = jnp.max(value)
        else:
            out[name] = jnp.mean(value)
    return out


def _global(x, axis_name):
    """psum over ``axis_name`` (None: no-op)."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _invariant_metrics(metrics: dict, axis_name) -> dict:
    """Metrics that still vary across the manual axes (a part computed a per-device
    value) are averaged over them, so every device reports the same number."""
    if axis_name is None:
        return metrics
    axes = set(axis_name if isinstance(axis_name, tuple) else (axis_name,))

    def one(x):
        vma = getattr(jax.typeof(x), "vma", frozenset())
        return jax.lax.pmean(x, tuple(axes & set(vma))) if axes & set(vma) else x
    return {k: one(v) for k, v in metrics.items()}


def accumulate_gradients(loss_fn: LossFn, params, batch, num_microbatches: int = 1, *,
                         axis_name=None):
    """Returns (grads, numerator, denominator, metrics) for the whole batch.

    ``loss_fn(params, microbatch) -> (numerator, (denominator, metrics))`` with the
    numerator and denominator summed over the rows the call sees. Under ``shard_map``
    (``axis_name`` = the manual batch axes) the call sees this device's rows: the
    gradient of the local numerator with respect to the replicated parameters is the
    global one (shard_map transposes the implicit broadcast of the parameters into a
    psum), and the numerator and denominator are psum-ed here.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(params, mb):
        (num, (den, metrics)), g = grad_fn(params, mb)
        return g, _global(num, axis_name), _global(den, axis_name), \
            _invariant_metrics(metrics, axis_name)

    if num_microbatches == 1:
        grads, num, den, metrics = one(params, batch)
    else:
        mbs = _microbatches(batch, num_microbatches)

        def body(carry, mb):
            g_acc, n_acc, d_acc = carry
            g, num, den, metrics = one(params, mb)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            return (g_acc, n_acc + num, d_acc + den), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, num, den), stacked = jax.lax.scan(body, init, mbs)
        metrics = _combine_metrics(stacked)
    scale = 1.0 / jnp.maximum(den, 1.0)
    grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    return grads, num, den, metrics


def sharded_gradients(loss_fn, params, batch, num_microbatches: int, *, mesh, axes):
    """``accumulate_gradients`` under ``shard_map``: rows of ``batch`` split over the
    manual batch ``axes`` of ``mesh`` (the other mesh axes, e.g. "tensor", are left to
    the compiler), ``loss_fn(params, mb, axis_name)`` sees this device's rows and
    takes exact cross-device statistics with ``axis_name``; parameters enter
    replicated over ``axes`` (FSDP shards are gathered) and gradients, numerator,
    denominator and metrics leave identical on every device."""
    from jax.sharding import PartitionSpec as P

    axes = tuple(a for a in axes if a in mesh.shape)
    if not axes:
        return accumulate_gradients(lambda p, mb: loss_fn(p, mb, None), params, batch,
                                    num_microbatches)

    def local(params, batch):
        return accumulate_gradients(lambda p, mb: loss_fn(p, mb, axes), params, batch,
                                    num_microbatches, axis_name=axes)

    batch_specs = jax.tree.map(lambda x: P(axes) if jnp.ndim(x) else P(), batch)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), batch_specs),
                         out_specs=(P(), P(), P(), P()), axis_names=set(axes))(params, batch)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation,
                    objective_state=None) -> tuple[TrainState, dict]:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        objective_state=(objective_state if objective_state is not None
                                         else state.objective_state))
    return new, {"grad_norm": optax.global_norm(grads)}


# ------------------------------------------------------------------------------- steps
def make_policy_step(graphdef, tx, objective: Objective, *, num_microbatches: int = 1,
                     temperature: float = 1.0, chunk_size: int = 512,
                     reuse_logp: bool = False, mesh=None, data_axes=None):
    """Policy-gradient update for any composed objective (GRPO family, PPO actor…).

    ``batch`` is a ``RolloutBatch`` (naive layout: one row per rollout) or a
    ``PackedRolloutBatch`` (shared-prefix layout: one row per prompt, see
    ``rlx.train.packing``); both give the same loss and gradients.
    ``reuse_logp``: the step is the only optimizer step on its own samples, so the
    behaviour log-probs are the current ones: ``old_logp = stop_gradient(logp)`` from
    this forward (ratio ≡ 1) instead of ``batch.policy.old_logp``.
    ``mesh`` + ``data_axes``: compute the gradients under ``shard_map`` over those batch
    axes (``sharded_gradients``), the objective taking exact cross-device statistics
    with ``axis_name``; without them, plain ``jit`` semantics (the compiler partitions).
    """

    def step(state: TrainState, batch: RolloutBatch | PackedRolloutBatch):
        t = batch.completion_length

        def loss_fn(params, mb, axis_name=None):
            seq = mb.packed if isinstance(mb, PackedRolloutBatch) else mb.seq
            outputs = token_outputs(graphdef, params, seq, t, temperature=temperature,
                                    chunk_size=chunk_size)
            policy = mb.policy
            if reuse_logp:
                policy = policy.replace(old_logp=jax.lax.stop_gradient(outputs.logp))
            out = objective.loss(outputs, policy, state.objective_state, axis_name=axis_name)
            return out.numerator, (out.denominator, out.metrics)

        if mesh is not None and data_axes:
            grads, num, den, metrics = sharded_gradients(
                loss_fn, state.params, batch, num_microbatches, mesh=mesh, axes=data_axes)
        else:
            grads, num, den, metrics = accumulate_gradients(loss_fn, state.params, batch,
                                                            num_microbatches)
        obj_state = objective.update(state.objective_state, metrics)
        state, extra = apply_gradients(state, grads, tx, obj_state)
        metrics = {**metrics, **extra, "loss": num / jnp.maximum(den, 1.0),
                   "loss_tokens": den}
        return state, metrics

    return step


def make_value_step(graphdef, tx, *, clip_eps: float | None = 0.2,
                    num_microbatches: int = 1):
    """Critic update: clipped value loss against ``batch.policy.returns`` (token-mean)."""

    def step(state: TrainState, batch: RolloutBatch | PackedRolloutBatch):
        t = batch.completion_length
        if batch.policy.returns is None or batch.policy.old_values is None:
            raise ValueError("value step needs PolicyBatch.returns and .old_values")

        def loss_fn(params, mb):
            seq = mb.packed if isinstance(mb, PackedRolloutBatch) else mb.seq
            v = token_values(graphdef, params, seq, t)
            loss, clipped = clipped_value_loss(v, mb.policy.old_values, mb.policy.returns,
                                               mb.policy.mask, clip_eps=clip_eps)
            m = (mb.policy.mask > 0).astype(jnp.float32)
            den = jnp.sum(m)
            return jnp.sum(loss), (den, {"value_clipfrac": jnp.sum(clipped) / jnp.maximum(den, 1),
                                         "value_mean": jnp.sum(v * m) / jnp.maximum(den, 1)})

        grads, num, den, metrics = accumulate_gradients(loss_fn, state.params, batch,
                                                        num_microbatches)
        state, extra = apply_gradients(state, grads, tx)
        return state, {**metrics, **{f"value_{k}": v for k, v in extra.items()},
                       "value_loss": num / jnp.maximum(den, 1.0)}

    return step


def make_sft_step(graphdef, tx, *, num_microbatches: int = 1):
    """Supervised next-token step: token-mean NLL over ``loss_mask`` targets."""

    def step(state: TrainState, batch: SFTBatch):
        def loss_fn(params, mb: SFTBatch):
            logp = token_outputs(graphdef, params, mb.seq, mb.seq.tokens.shape[1] - 1).logp
            m = mb.loss_mask[:, 1:].astype(jnp.float32)
            return -jnp.sum(logp * m), (jnp.sum(m), {})

        grads, num, den, metrics = accumulate_gradients(loss_fn, state.params, batch,
                                                        num_microbatches)
        state, extra = apply_gradients(state, grads, tx)
        return state, {**extra, "sft_loss": num / jnp.maximum(den, 1.0), "sft_tokens": den}

    return step


def make_reward_model_step(graphdef, tx, *, margin: float | None = None,
                           num_microbatches: int = 1):
    """Bradley-Terry reward-model step on (chosen, rejected) pairs (mean over pairs)."""

    def step(state: TrainState, batch: PairBatch):
        def loss_fn(params, mb: PairBatch):
            rc = api.rewards(graphdef, params, mb.chosen.tokens, mb.chosen.positions,
                             mb.chosen.attention_mask)
            rr = api.rewards(graphdef, params, mb.rejected.tokens, mb.rejected.positions,
                             mb.rejected.attention_mask)
            loss = preference.bradley_terry_loss(rc, rr, margin=margin)
            n = jnp.asarray(rc.shape[0], jnp.float32)
            return jnp.sum(loss), (n, {"rm_accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
                                       "rm_margin": jnp.mean(rc - rr)})

        grads, num, den, metrics = accumulate_gradients(loss_fn, state.params, batch,
                                                        num_microbatches)
        state, extra = apply_gradients(state, grads, tx)
        return state, {**metrics, **extra, "rm_loss": num / jnp.maximum(den, 1.0)}

    return step


def make_preference_step(graphdef, tx, *, loss: str = "dpo", beta: float = 0.1,
                         num_microbatches: int = 1, **loss_kwargs):
    """DPO-family step: ``loss`` in {"dpo", "ipo", "simpo"} on summed response log-probs
    (``beta`` is DPO's/SimPO's β and IPO's τ)."""
    losses = {"dpo": preference.dpo_loss, "ipo": preference.ipo_loss,
              "simpo": preference.simpo_loss}
    if loss not in losses:
        raise ValueError(f"preference loss {loss!r}: expected one of {sorted(losses)}")

    def step(state: TrainState, batch: PairBatch):
        def loss_fn(params, mb: PairBatch):
            lc = sequence_logprob(graphdef, params, mb.chosen, mb.chosen_mask)
            lr = sequence_logprob(graphdef, params, mb.rejected, mb.rejected_mask)
            if loss == "simpo":
                nc = jnp.sum(mb.chosen_mask[:, 1:], axis=1)
                nr = jnp.sum(mb.rejected_mask[:, 1:], axis=1)
                per = preference.simpo_loss(lc, lr, nc, nr, beta=beta, **loss_kwargs)
            elif loss == "ipo":   # IPO's regulariser is τ; ``beta`` plays that role
                per = preference.ipo_loss(lc, lr, mb.ref_chosen_logp, mb.ref_rejected_logp,
                                          tau=beta, **loss_kwargs)
            else:
                per = preference.dpo_loss(lc, lr, mb.ref_chosen_logp, mb.ref_rejected_logp,
                                          beta=beta, **loss_kwargs)
            margin = (lc - mb.ref_chosen_logp) - (lr - mb.ref_rejected_logp)
            n = jnp.asarray(lc.shape[0], jnp.float32)
            return jnp.sum(per), (n, {"pref_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
                                      "pref_margin": jnp.mean(margin)})

        grads, num, den, metrics = accumulate_gradients(loss_fn, state.params, batch,
                                                        num_microbatches)
        state, extra = apply_gradients(state, grads, tx)
        return state, {**metrics, **extra, "pref_loss": num / jnp.maximum(den, 1.0)}

    return step


# ------------------------------------------------------------------------------ jitting
def jit_step(step_fn, mesh, state_shardings, batch_example):
    """jit with explicit in/out shardings; the state buffer is donated."""
    from rlx import sharding as sh

    batch_sh = jax.tree.map(
        lambda x: sh.replicated(mesh) if jnp.ndim(x) == 0 else sh.batch_sharding(mesh, jnp.ndim(x)),
        batch_example)
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, sh.replicated(mesh)), donate_argnums=(0,))
