"""Preference batches and the two preference-learning loops (reward model, DPO family).

The pairs themselves come from a recipe: ``rlx.recipes.preference_data`` synthesises
them from a verifiable task, ``rlx.data.records`` reads a user's file. This module
is engine code any recipe can use.

Tokenised layout (``pairs_to_batch``): each row is ``[bos] prompt | response [eos]``,
right-padded to one width per pair set; ``*_mask`` marks the response tokens (eos
included), which are the targets of ``sequence_logprob`` and the tokens a reward model
reads up to (its score sits at the last real token).

Loops (host side; the updates are the jitted steps of ``rlx.train.steps``):

- ``train_reward_model``: Bradley-Terry steps −log σ(r_c − r_r) (arXiv 2203.02155) on
  random minibatches of pairs; held-out pair accuracy P[r(c) > r(r)] before and after.
- ``train_dpo``: DPO / IPO / SimPO steps (arXiv 2305.18290, 2310.12036, 2405.14734)
  against a frozen reference whose summed response log-probs are computed once per
  pair before training; held-out preference accuracy P[h > 0] with the implicit-reward
  margin h = (log π_c − log π_ref,c) − (log π_r − log π_ref,r), before and after.

Resumable: with ``checkpoint_dir`` both loops save the training state, the position of
the minibatch RNG and the logged history as ``rlx.train.PhaseCheckpoints`` says (and
after the last step); a killed loop rerun with the same arguments continues from its
last save and ends bitwise where an uninterrupted one ends (CPU). The checkpoints'
identity (steps, batch size, lr, seed, loss settings, the pairs and the starting
parameters) must match, else ``CheckpointMismatch`` is raised before any step (or, with
``on_mismatch="fresh"`` / ``"partial"``, a sibling directory is used / the matching
leaves warm-start the phase).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlx import sharding as sh
from rlx.data.records import PreferencePair
from rlx.train import checkpoint as ckpt_lib
from rlx.train import optim
from rlx.train import state as state_lib
from rlx.train import steps as steps_lib
from rlx.train.batches import PairBatch, make_sequences


@functools.lru_cache(maxsize=8)
def _logprob_fn(graphdef):
    return jax.jit(functools.partial(steps_lib.sequence_logprob, graphdef))


@functools.lru_cache(maxsize=8)
def _reward_fn(graphdef):
    from rlx.models import api

    return jax.jit(lambda p, s: api.rewards(graphdef, p, s.tokens, s.positions,
                                            s.attention_mask))


# ---------------------------------------------------------------------------- batches
def _encode(tok, prompt: str, response: str) -> tuple[list[int], int]:
    head = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    tail = tok.encode(response) + ([tok.eos_id] if tok.eos_id is not None else [])
    return head + tail, len(head)


def pair_width(tok, pairs: Sequence[PreferencePair], *, multiple: int = 8) -> int:
    """The padded width S that fits every sequence of ``pairs`` (rounded up)."""
    longest = max(len(_encode(tok, p.prompt, r)[0]) for p in pairs
                  for r in (p.chosen, p.rejected))
    return -(-longest // multiple) * multiple


def pairs_to_batch(tok, pairs: Sequence[PreferencePair], *, width: int | None = None
                   ) -> PairBatch:
    """Tokenises pairs into a ``PairBatch`` [B, S] (right padding, zero reference
    log-probs; fill them with ``with_reference_logprobs``).

    Raises ValueError when a sequence is longer than ``width`` or a response is empty.
    """
    if not pairs:
        raise ValueError("pairs_to_batch: no pairs")
    width = width or pair_width(tok, pairs)
    n = len(pairs)

    def side(texts_of):
        ids = np.full((n, width), tok.pad_id, np.int32)
        mask = np.zeros((n, width), bool)
        target = np.zeros((n, width), np.float32)
        for i, p in enumerate(pairs):
            row, start = _encode(tok, p.prompt, texts_of(p))
            if len(row) > width:
                raise ValueError(f"pair {i}: {len(row)} tokens exceed width={width}")
            if not texts_of(p):
                raise ValueError(f"pair {i}: empty response")
            ids[i, :len(row)] = row
            mask[i, :len(row)] = True
            target[i, start:len(row)] = 1.0
        return make_sequences(ids, mask), jnp.asarray(target)

    chosen, chosen_mask = side(lambda p: p.chosen)
    rejected, rejected_mask = side(lambda p: p.rejected)
    zeros = jnp.zeros((n,), jnp.float32)
    return PairBatch(chosen=chosen, rejected=rejected, chosen_mask=chosen_mask,
                     rejected_mask=rejected_mask, ref_chosen_logp=zeros,
                     ref_rejected_logp=zeros)


def take(batch: PairBatch, rows) -> PairBatch:
    """Rows ``rows`` of every [B, ...] leaf."""
    rows = jnp.asarray(rows)
    return jax.tree.map(lambda x: x[rows], batch)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


def with_reference_logprobs(graphdef, ref_params, batch: PairBatch, *, chunk: int = 64
                            ) -> PairBatch:
    """Fills ``ref_*_logp`` [B] with the frozen reference's summed response log-probs."""
    fn = _logprob_fn(graphdef)
    rc, rr = [], []
    for rows in _chunks(batch.chosen.tokens.shape[0], chunk):
        part = take(batch, rows)
        rc.append(fn(ref_params, part.chosen, part.chosen_mask))
        rr.append(fn(ref_params, part.rejected, part.rejected_mask))
    return dataclasses.replace(batch, ref_chosen_logp=jnp.concatenate(rc),
                               ref_rejected_logp=jnp.concatenate(rr))


# ---------------------------------------------------------------------- evaluation
def reward_scores(graphdef, params, batch: PairBatch, *, chunk: int = 64
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Reward-model scores (chosen [B], rejected [B]) as float32 numpy."""
    fn = _reward_fn(graphdef)
    rc, rr = [], []
    for rows in _chunks(batch.chosen.tokens.shape[0], chunk):
        part = take(batch, rows)
        rc.append(np.asarray(fn(params, part.chosen)))
        rr.append(np.asarray(fn(params, part.rejected)))
    return np.concatenate(rc), np.concatenate(rr)


def reward_model_accuracy(graphdef, params, batch: PairBatch) -> dict:
    """Pair accuracy P[r(chosen) > r(rejected)] and the mean margin."""
    rc, rr = reward_scores(graphdef, params, batch)
    return {"rm/accuracy": float(np.mean(rc > rr)), "rm/margin": float(np.mean(rc - rr))}


def preference_margins(graphdef, params, batch: PairBatch, *, chunk: int = 64
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(h [B], Δ [B]): the DPO implicit-reward margin h against the batch's reference
    log-probs, and the raw policy log-prob gap Δ = log π(c) − log π(r)."""
    fn = _logprob_fn(graphdef)
    lc, lr = [], []
    for rows in _chunks(batch.chosen.tokens.shape[0], chunk):
        part = take(batch, rows)
        lc.append(np.asarray(fn(params, part.chosen, part.chosen_mask)))
        lr.append(np.asarray(fn(params, part.rejected, part.rejected_mask)))
    lc, lr = np.concatenate(lc), np.concatenate(lr)
    h = (lc - np.asarray(batch.ref_chosen_logp)) - (lr - np.asarray(batch.ref_rejected_logp))
    return h, lc - lr


def preference_accuracy(graphdef, params, batch: PairBatch) -> dict:
    """P[h > 0], mean h (implicit-reward margin) and P[log π(c) > log π(r)]."""
    h, gap = preference_margins(graphdef, params, batch)
    return {"pref/accuracy": float(np.mean(h > 0)), "pref/margin": float(np.mean(h)),
            "pref/logp_accuracy": float(np.mean(gap > 0))}


# --------------------------------------------------------------------------- loops
def pairs_fingerprint(batch: PairBatch) -> str:
    """SHA-256 (16 hex digits) of a pair set's token ids and masks."""
    import hashlib

    h = hashlib.sha256()
    for x in jax.tree.leaves((batch.chosen, batch.rejected, batch.chosen_mask,
                              batch.rejected_mask)):
        a = np.asarray(sh.host_value(x))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _train(step_factory, params, batch: PairBatch, *, steps: int, batch_size: int,
           lr: float, seed: int, mesh, log_every: int, logger,
           log_offset: int | None, phase: str, identity: dict,
           checkpoint_dir: str | None = None,
           checkpoints: ckpt_lib.PhaseCheckpoints | None = None, on_mismatch: str = "error"):
    """Shared loop: random minibatches of ``batch_size`` pairs, ``steps`` jitted steps.
    Logged at step ``i + 1 + log_offset`` (None: ``-steps``, i.e. ending at 0 like the
    SFT warm-up, for a phase that precedes RL). Resumable (module docstring)."""
    log_offset = -steps if log_offset is None else log_offset
    n = batch.chosen.tokens.shape[0]
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training pairs")
    mesh = mesh or sh.make_mesh()
    tx = optim.warmup_cosine(lr, steps)
    ident = {**identity, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
             "pairs": pairs_fingerprint(batch), "init": ckpt_lib.tree_identity(params)}
    state = state_lib.create(params, tx, seed=seed)
    shardings = sh.state_shardings(state, mesh)
    state = sh.place(state, shardings)
    rng = np.random.default_rng(seed)
    step_fn = None
    with ckpt_lib.PhaseLoop(checkpoint_dir, phase=phase, steps=steps, identity=ident,
                            config=checkpoints, on_mismatch=on_mismatch) as loop:
        start, state, data_state, extra = loop.restore(state, shardings)
        if data_state and "rng" in data_state:
            rng.bit_generator.state = data_state["rng"]
        history = list(extra.get("history", []))
        for i in range(start, steps):
            mb = sh.shard_batch(take(batch, rng.choice(n, batch_size, replace=False)), mesh)
            if step_fn is None:
                step_fn = steps_lib.jit_step(step_factory(tx), mesh, shardings, mb)
            state, metrics = step_fn(state, mb)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                history.append({"step": i + 1, **row})
                if logger is not None:
                    logger.log(i + 1 + log_offset, row)
            loop.done(i + 1, state, data_state={"rng": rng.bit_generator.state},
                      extra={"history": history})
    return state.params, history


def train_reward_model(graphdef, params, train: PairBatch, heldout: PairBatch, *,
                       steps: int, batch_size: int = 32, lr: float = 1e-3,
                       margin: float | None = None, seed: int = 0, mesh=None,
                       log_every: int = 25, logger=None, log_offset: int | None = None,
                       checkpoint_dir: str | None = None,
                       checkpoints: ckpt_lib.PhaseCheckpoints | None = None,
                       on_mismatch: str = "error") -> tuple[Any, dict]:
    """Bradley-Terry training of a reward model (``api.init(cfg, kind="reward")``).

    Returns (params, report) with ``rm/accuracy_before``, ``rm/accuracy`` (after),
    ``rm/margin`` on ``heldout`` and the logged training rows under ``history``.
    ``checkpoint_dir``: resume from / save to it (module docstring).
    """
    before = reward_model_accuracy(graphdef, params, heldout)
    params, history = _train(
        lambda tx: steps_lib.make_reward_model_step(graphdef, tx, margin=margin),
        params, train, steps=steps, batch_size=batch_size, lr=lr, seed=seed, mesh=mesh,
        log_every=log_every, logger=logger, log_offset=log_offset,
        phase="reward-model training", identity={"phase": "reward_model", "margin": margin},
        checkpoint_dir=checkpoint_dir, checkpoints=checkpoints, on_mismatch=on_mismatch)
    after = reward_model_accuracy(graphdef, params, heldout)
    return params, {"rm/accuracy_before": before["rm/accuracy"], **after,
                    "history": history}


def train_dpo(graphdef, params, ref_params, train: PairBatch, heldout: PairBatch, *,
              steps: int, batch_size: int = 32, lr: float = 1e-4, loss: str = "dpo",
              beta: float = 0.1, seed: int = 0, mesh=None, log_every: int = 25,
              logger=None, log_offset: int | None = None,
              checkpoint_dir: str | None = None,
              checkpoints: ckpt_lib.PhaseCheckpoints | None = None,
              on_mismatch: str = "error", **loss_kwargs
              ) -> tuple[Any, dict]:
    """DPO-family training of the policy against the frozen ``ref_params``.

    Reference log-probs of both pair sets are computed once, before the first step.
    Returns (params, report): ``pref/accuracy`` (P[h>0]), ``pref/margin`` (mean h),
    ``pref/logp_accuracy`` on ``heldout`` after training, the same with ``_before``
    (h ≡ 0 at the start, so only the log-prob accuracy is informative there), and
    ``history``. ``checkpoint_dir``: resume from / save to it (module docstring; the
    identity includes the reference parameters).
    """
    train = with_reference_logprobs(graphdef, ref_params, train)
    heldout = with_reference_logprobs(graphdef, ref_params, heldout)
    before = preference_accuracy(graphdef, params, heldout)
    params, history = _train(
        lambda tx: steps_lib.make_preference_step(graphdef, tx, loss=loss, beta=beta,
                                                  **loss_kwargs),
        params, train, steps=steps, batch_size=batch_size, lr=lr, seed=seed, mesh=mesh,
        log_every=log_every, logger=logger, log_offset=log_offset,
        phase=f"{loss.upper()} training",
        identity={"phase": "preference", "loss": loss, "beta": beta,
                  "loss_kwargs": dict(sorted(loss_kwargs.items())),
                  "reference": ckpt_lib.tree_identity(ref_params)},
        checkpoint_dir=checkpoint_dir, checkpoints=checkpoints, on_mismatch=on_mismatch)
    after = preference_accuracy(graphdef, params, heldout)
    return params, {**{f"{k}_before": v for k, v in before.items()}, **after,
                    "history": history}
