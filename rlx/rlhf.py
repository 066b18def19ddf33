"""RLHF and DPO experiments: learning from preferences instead of a verifier.

Both reuse the pieces of ``rlx.experiment`` (tokenizer, SFT warm-up, greedy held-out
evaluation, ``RLTrainer``) and take their shared settings from its ``Experiment``
(``base``: task, model, SFT, sampler, RL loop sizes, run directory, seed), so
``rlx.Experiment.*`` bindings configure them as they configure ``rlx train``.

RLHF (``run_rlhf``; Ouyang et al. 2022, arXiv 2203.02155, with GRPO or PPO as the RL
step):
  1. SFT warm-up on demonstrations (``Experiment.sft_*``; skipped when saved).
  2. Preference pairs: synthetic ones from the task (chosen = demonstration, rejected
     = a verified-wrong corruption; ``rlx.train.preference.make_preference_pairs``)
     or the user's ``preference_file``; held-out pairs come from the held-out problems
     (or the file's last ``eval_pairs`` records).
  3. A Bradley-Terry reward model initialised from the SFT trunk (new scalar head)
     trains on the pairs; its held-out pair accuracy is reported.
  4. RL (``Experiment.objective``: GRPO by default, ``"ppo"`` trains a critic as in
     ``rlx train``) against ``LearnedReward``, normalised with the mean / std of the
     reward model's scores on its training pairs; the verifier runs alongside as a
     monitor only (``reward/verifiable/mean`` in metrics.jsonl).
  5. Held-out accuracy with the *verifiable* reward before and after RL: whether
     optimising the learned reward improved the real metric.

DPO (``run_dpo``; arXiv 2305.18290, also IPO / SimPO via ``loss``): SFT warm-up → the
same pairs → DPO-family steps against the frozen SFT policy → held-out accuracy before
and after, and held-out preference accuracy.

Restarts: the SFT, reward-model and DPO results are saved under the run directory and
reused by the same command; the RL phase resumes from its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from rlx import experiment as ex
from rlx import sharding as sh
from rlx.models import api
from rlx.models.config import model_config
from rlx.rewards.learned import LearnedReward
from rlx.rewards.pool import RewardPool
from rlx.train import checkpoint as ckpt_lib
from rlx.train import optim, rl
from rlx.train import preference as pref
from rlx.train import state as state_lib
from rlx.train.data import ProblemStream
from rlx.train.logger import RunLogger


@gin.configurable(module="rlx")
@dataclasses.dataclass(frozen=True)
class RLHFExperiment:
    """Reward model + RL against it (see the module docstring).

    Attributes:
      base: the shared experiment settings (``rlx.Experiment`` bindings apply).
      preference_problems: train problems turned into pairs (the first N of the pool).
      pairs_per_problem: rejected answers per problem.
      eval_pairs: held-out pairs for the reward-model accuracy (held-out problems).
      corruptions: kinds of wrong answers (``rlx.train.preference.CORRUPTIONS``).
      preference_file: user pairs ``{"prompt", "chosen", "rejected"}`` (JSONL/Parquet)
        instead of synthetic ones; its last ``eval_pairs`` records are held out.
      rm_steps / rm_batch / rm_lr / rm_margin: Bradley-Terry training.
      reward_normalize: ``LearnedReward.normalize`` (``"fixed"`` = the training-pair
        score mean / std; ``"batch"``; None).
      monitor_verifiable: also score RL rollouts with the verifier (metrics only).
    """

    base: ex.Experiment = dataclasses.field(default_factory=ex.Experiment)
    preference_problems: int = 2000
    pairs_per_problem: int = 2
    eval_pairs: int = 200
    corruptions: tuple = pref.CORRUPTIONS
    preference_file: str | None = None
    rm_steps: int = 200
    rm_batch: int = 32
    rm_lr: float = 1e-3
    rm_margin: float | None = None
    reward_normalize: str | None = "fixed"
    monitor_verifiable: bool = True


@gin.configurable(module="rlx")
@dataclasses.dataclass(frozen=True)
class DPOExperiment:
    """DPO-family preference optimisation from the SFT policy (see the module docstring).

    Attributes:
      base, preference_problems, pairs_per_problem, eval_pairs, corruptions,
        preference_file: as in ``RLHFExperiment``.
      loss: ``"dpo"``, ``"ipo"`` or ``"simpo"`` (``make_preference_step``).
      beta: β of DPO / SimPO; for IPO pass ``loss_kwargs={"tau": ...}``.
      loss_kwargs: other keyword arguments of the loss (``label_smoothing``, ``gamma``).
      dpo_steps / dpo_batch / dpo_lr: the preference optimisation.
    """

    base: ex.Experiment = dataclasses.field(default_factory=ex.Experiment)
    preference_problems: int = 2000
    pairs_per_problem: int = 2
    eval_pairs: int = 200
    corruptions: tuple = pref.CORRUPTIONS
    preference_file: str | None = None
    loss: str = "dpo"
    beta: float = 0.1
    loss_kwargs: dict = dataclasses.field(default_factory=dict)
    dpo_steps: int = 200
    dpo_batch: int = 32
    dpo_lr: float = 1e-4


# ----------------------------------------------------------------------- shared part
@dataclasses.dataclass
class Prepared:
    """What both experiments share after the SFT warm-up."""

    mesh: Any
    task: Any
    train: list
    heldout: list
    tok: Any
    sampler: Any
    pool: RewardPool
    logger: RunLogger
    cfg: Any
    graphdef: Any
    params: Any
    before: dict

    def evaluate(self, params) -> dict:
        return ex.evaluate(self.graphdef, params, self.tok, self.heldout, self.pool,
                           sampler=self.sampler, mesh=self.mesh)


def prepare(base: ex.Experiment, *, total_steps: int) -> Prepared:
    """Problems, tokenizer, sampler, verifier pool, SFT warm-up and its evaluation
    (the first half of ``rlx.experiment.run``)."""
    os.makedirs(base.run_dir, exist_ok=True)
    mesh = sh.make_mesh(base.mesh_shape)
    task, train, heldout = ex.load_problems(base)
    tok = ex.build_tokenizer(base, task, train)
    if base.use_chat_template:
        train, heldout = ex.apply_chat_template(tok, train), ex.apply_chat_template(tok, heldout)
    sampler = dataclasses.replace(
        base.sampler, stop_token_ids=(tok.eos_id,), pad_id=tok.pad_id,
        num_generations=base.num_generations, max_new_tokens=base.max_new_tokens,
        temperature=base.temperature,
        completion_buckets=tuple(sorted({base.max_new_tokens,
                                         *base.sampler.completion_buckets})))
    logger = RunLogger(base.run_dir, total_steps=total_steps)
    pool = RewardPool(ex.reward_spec(base, task), backend="inline")
    if base.hf_checkpoint:
        from rlx.models.convert import load_hf
        cfg, graphdef, params = load_hf(base.hf_checkpoint, overrides=base.model_overrides)
    else:
        cfg = model_config(base.model, **{"vocab_size": tok.vocab_size,
                                          **base.model_overrides})
        graphdef, params = api.init(cfg, seed=base.seed)
    params = _cached(os.path.join(base.run_dir, "sft"), params, lambda: ex.run_sft(
        graphdef, params, tok, task, train, steps=base.sft_steps, batch=base.sft_batch,
        lr=base.sft_lr, seed=base.seed, mesh=mesh, logger=logger),
        skip=not base.sft_steps, step=base.sft_steps)[0]
    prepared = Prepared(mesh, task, train, heldout, tok, sampler, pool, logger, cfg,
                        graphdef, params, {})
    prepared.before = prepared.evaluate(params)
    print(f"held-out accuracy after SFT: {prepared.before['eval/accuracy']:.3f}", flush=True)
    return prepared


def _cached(directory: str, like, compute, *, skip: bool = False, step: int = 1):
    """(params, extra): restored from ``directory`` when saved, else ``compute()``
    (returning params or (params, report)) and saved with the report as ``extra``."""
    ckpt = ckpt_lib.Checkpointer(directory, every_steps=None, keep=1, async_save=False)
    try:
        restored = ckpt.restore_latest(ckpt_lib.abstract_like(like))
        if restored is not None:
            return restored[1], restored[3]
        if skip:
            return like, {}
        out = compute()
        params, report = out if isinstance(out, tuple) else (out, {})
        ckpt.save(max(step, 1), params, extra=report)
        return params, report
    finally:
        ckpt.close()


def preference_pairs(exp, p: Prepared):
    """(train PairBatch, held-out PairBatch) with one common width."""
    if exp.preference_file:
        from rlx.data.records import read_records
        records = read_records(exp.preference_file, kind="preference")
        if len(records) <= exp.eval_pairs:
            raise ValueError(f"{exp.preference_file}: {len(records)} pairs, need more than "
                             f"eval_pairs={exp.eval_pairs} to hold some out")
        train, heldout = records[:-exp.eval_pairs], records[-exp.eval_pairs:]
    else:
        rng = random.Random(f"pairs|{exp.base.seed}")
        train = pref.make_preference_pairs(
            p.task, p.train[:exp.preference_problems], rng=rng,
            pairs_per_problem=exp.pairs_per_problem, corruptions=exp.corruptions)
        heldout = pref.make_preference_pairs(
            p.task, p.heldout, rng=rng, corruptions=exp.corruptions)[:exp.eval_pairs]
        if not train or not heldout:
            raise ValueError(f"task {exp.base.task!r} gave {len(train)} train / "
                             f"{len(heldout)} held-out preference pairs; need some of each")
    width = max(pref.pair_width(p.tok, train), pref.pair_width(p.tok, heldout))
    return (pref.pairs_to_batch(p.tok, train, width=width),
            pref.pairs_to_batch(p.tok, heldout, width=width))


def _finish(base: ex.Experiment, p: Prepared, params, summary: dict, t_start: float) -> dict:
    plot = p.logger.plot()
    export = None
    if base.export_hf and jax.process_index() == 0:
        from rlx.models.convert import save_hf
        export = os.path.join(base.run_dir, "hf_export")
        save_hf(export, p.cfg, jax.device_get(params), overwrite=True)
    summary = {**summary, "wall_seconds": time.time() - t_start, "run_dir": base.run_dir,
               "plot": plot, "hf_export": export, "seed": base.seed}
    if jax.process_index() == 0:
        with open(os.path.join(base.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    p.logger.close()
    return summary


# ---------------------------------------------------------------------------- RLHF
def objective_and_critic(base: ex.Experiment, cfg, params):
    """The RL objective, and for ``"ppo"`` a separately trained critic whose trunk
    starts from the SFT policy's (the objective then drops its in-loss value term),
    as in ``rlx.experiment.run``."""
    if base.objective != "ppo":
        return ex.objective_by_name(base.objective), None
    value_graphdef, value_params = api.init(cfg, kind="value", seed=base.seed)
    value_params["trunk"] = jax.tree.map(jnp.copy, params["trunk"])
    critic_tx = optim.optimizer(learning_rate=base.critic_lr)
    critic = rl.Critic(graphdef=value_graphdef, tx=critic_tx,
                       state=state_lib.create(value_params, critic_tx, seed=base.seed))
    return ex.objective_by_name("ppo", vf_coef=0.0), critic


def run_rlhf(exp: RLHFExperiment) -> dict:
    """SFT → reward model on pairs → RL against it → verifiable evaluation."""
    t_start = time.time()
    base = exp.base
    p = prepare(base, total_steps=base.rl.steps)
    train_pairs, heldout_pairs = preference_pairs(exp, p)

    # reward model from the SFT trunk (a fresh scalar head)
    rm_graphdef, rm_params = api.init(p.cfg, kind="reward", seed=base.seed)
    rm_params["trunk"] = jax.tree.map(jnp.copy, p.params["trunk"])

    def fit():
        params, report = pref.train_reward_model(
            rm_graphdef, rm_params, train_pairs, heldout_pairs, steps=exp.rm_steps,
            batch_size=min(exp.rm_batch, train_pairs.chosen.tokens.shape[0]),
            lr=exp.rm_lr, margin=exp.rm_margin, seed=base.seed, mesh=p.mesh,
            logger=p.logger)
        rc, rr = pref.reward_scores(rm_graphdef, params, train_pairs)
        both = np.concatenate([rc, rr])
        report = {k: v for k, v in report.items() if k != "history"}
        return params, {**report, "rm/train_score_mean": float(both.mean()),
                        "rm/train_score_std": float(both.std())}

    rm_params, rm_report = _cached(os.path.join(base.run_dir, "reward_model"), rm_params,
                                   fit, step=exp.rm_steps)
    print(f"reward model held-out pair accuracy: {rm_report['rm/accuracy']:.3f} "
          f"(before training {rm_report['rm/accuracy_before']:.3f})", flush=True)
    learned = LearnedReward(
        rm_graphdef, rm_params, p.tok, normalize=exp.reward_normalize,
        mean=rm_report["rm/train_score_mean"],
        std=max(rm_report["rm/train_score_std"], 1e-3),
        monitor=p.pool if exp.monitor_verifiable else None)

    # RL against the learned reward (PPO: a critic from the SFT trunk)
    objective, critic = objective_and_critic(base, p.cfg, p.params)
    tx = optim.optimizer(learning_rate=base.rl_lr)
    state = state_lib.create(p.params, tx, seed=base.seed, objective_state=objective.init())
    trainer = rl.RLTrainer(
        graphdef=p.graphdef, state=state, tx=tx, objective=objective, tokenizer=p.tok,
        stream=ProblemStream(p.train, seed=base.seed), reward_pool=learned,
        sampler=p.sampler, config=base.rl, run_dir=base.run_dir, mesh=p.mesh,
        ref_params=ex._reference(objective, p.params), evaluator=p.evaluate,
        logger=p.logger, critic=critic)
    history = trainer.run()
    after = p.evaluate(trainer.state.params)
    trainer.checkpointer.close()
    verifiable = [r["reward/verifiable/mean"] for r in history if "reward/verifiable/mean" in r]
    summary = {"experiment": "rlhf", "objective": base.objective,
               "accuracy_before_rl": p.before["eval/accuracy"],
               "accuracy_after_rl": after["eval/accuracy"], "rl_steps": base.rl.steps,
               "rm_accuracy": rm_report["rm/accuracy"],
               "rm_accuracy_before": rm_report["rm/accuracy_before"],
               "rm_train_pairs": int(train_pairs.chosen.tokens.shape[0]),
               "rm_heldout_pairs": int(heldout_pairs.chosen.tokens.shape[0]),
               "learned_reward_first": history[0].get("reward/mean") if history else None,
               "learned_reward_last": history[-1].get("reward/mean") if history else None,
               "verifiable_reward_first": verifiable[0] if verifiable else None,
               "verifiable_reward_last": verifiable[-1] if verifiable else None}
    return _finish(base, p, trainer.state.params, summary, t_start)


# ----------------------------------------------------------------------------- DPO
def run_dpo(exp: DPOExperiment) -> dict:
    """SFT → DPO-family optimisation on pairs → verifiable evaluation."""
    t_start = time.time()
    base = exp.base
    p = prepare(base, total_steps=exp.dpo_steps)
    train_pairs, heldout_pairs = preference_pairs(exp, p)
    reference = jax.tree.map(jnp.copy, p.params)

    def fit():
        params, report = pref.train_dpo(
            p.graphdef, p.params, reference, train_pairs, heldout_pairs,
            steps=exp.dpo_steps,
            batch_size=min(exp.dpo_batch, train_pairs.chosen.tokens.shape[0]),
            lr=exp.dpo_lr, loss=exp.loss, beta=exp.beta, seed=base.seed, mesh=p.mesh,
            logger=p.logger, log_offset=0, **exp.loss_kwargs)
        return params, {k: v for k, v in report.items() if k != "history"}

    params, report = _cached(os.path.join(base.run_dir, "dpo"), p.params, fit,
                             step=exp.dpo_steps)
    after = p.evaluate(params)
    summary = {"experiment": "dpo", "objective": exp.loss,
               "accuracy_before_dpo": p.before["eval/accuracy"],
               "accuracy_after_dpo": after["eval/accuracy"], "dpo_steps": exp.dpo_steps,
               "beta": exp.beta, **{k.replace("/", "_"): v for k, v in report.items()},
               "train_pairs": int(train_pairs.chosen.tokens.shape[0]),
               "heldout_pairs": int(heldout_pairs.chosen.tokens.shape[0])}
    return _finish(base, p, params, summary, t_start)
