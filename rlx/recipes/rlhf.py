"""RLHF and DPO: learning from preferences instead of a verifier.

Both start with the shared preparation of ``rlx.recipes.prepare`` (tokenizer, SFT
warm-up, greedy held-out evaluation) and take their shared settings from an
``Experiment`` (``base``: task, model, SFT, sampler, RL loop sizes, run directory,
seed), so ``rlx.Experiment.*`` bindings configure them as they configure ``rlx train``.

RLHF (``run_rlhf``; Ouyang et al. 2022, arXiv 2203.02155, with GRPO or PPO as the RL
step):
  1. SFT warm-up on demonstrations (``Experiment.sft_*``; skipped when saved).
  2. Preference pairs: synthetic ones from the task (chosen = demonstration, rejected
     = a verified-wrong corruption; ``rlx.recipes.preference_data``) or the user's
     ``preference_file``; held-out pairs come from the held-out problems (or the
     file's last ``eval_pairs`` records).
  3. A Bradley-Terry reward model initialised from the SFT trunk (new scalar head)
     trains on the pairs (``rlx.train.preference.train_reward_model``); its held-out
     pair accuracy is reported.
  4. RL (``Experiment.objective``: GRPO by default, ``"ppo"`` trains a critic as in
     ``rlx train``; ``prepare.train_rl``) against ``LearnedReward``, normalised with the
     mean / std of the reward model's scores on its training pairs; the verifier runs
     alongside as a monitor only (``reward/verifiable/mean`` in metrics.jsonl).
  5. Held-out accuracy with the *verifiable* reward before and after RL: whether
     optimising the learned reward improved the real metric.

DPO (``run_dpo``; arXiv 2305.18290, also IPO / SimPO via ``loss``): SFT warm-up → the
same pairs → DPO-family steps against the frozen SFT policy → held-out accuracy before
and after, and held-out preference accuracy.

Restarts: every phase checkpoints and resumes (a kill anywhere, then the same command,
continues from the last save): the SFT warm-up (``<run_dir>/sft_progress``, its result
in ``<run_dir>/sft``), the reward model (``<run_dir>/reward_model``), DPO
(``<run_dir>/dpo``) and the RL phase with its critic (``<run_dir>/checkpoints``); how
often: ``rlx.train.PhaseCheckpoints`` and ``rlx.train.RLConfig``. A finished phase is
restored, not retrained. A phase saved with other settings is refused before any work
(or handled as ``rlx.train.RLConfig.on_mismatch`` says, for every phase).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from rlx.models import api
from rlx.recipes import preference_data, prepare, validate
from rlx.recipes.experiment import Experiment
from rlx.rewards.learned import LearnedReward
from rlx.train import preference as pref
from rlx.train import signals


@gin.configurable(module="rlx")
@dataclasses.dataclass(frozen=True)
class RLHFExperiment:
    """Reward model + RL against it (see the module docstring).

    Attributes:
      base: the shared experiment settings (``rlx.Experiment`` bindings apply).
      preference_problems: train problems turned into pairs (the first N of the pool).
      pairs_per_problem: rejected answers per problem.
      eval_pairs: held-out pairs for the reward-model accuracy (held-out problems).
      corruptions: kinds of wrong answers (``rlx.recipes.preference_data.CORRUPTIONS``).
      preference_file: user pairs ``{"prompt", "chosen", "rejected"}`` (JSONL/Parquet)
        instead of synthetic ones; its last ``eval_pairs`` records are held out.
      rm_steps / rm_batch / rm_lr / rm_margin: Bradley-Terry training.
      reward_normalize: ``LearnedReward.normalize`` (``"fixed"`` = the training-pair
        score mean / std; ``"batch"``; None).
      monitor_verifiable: also score RL rollouts with the verifier (metrics only).
    """

    base: Experiment = dataclasses.field(default_factory=Experiment)
    preference_problems: int = 2000
    pairs_per_problem: int = 2
    eval_pairs: int = 200
    corruptions: tuple = preference_data.CORRUPTIONS
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

    base: Experiment = dataclasses.field(default_factory=Experiment)
    preference_problems: int = 2000
    pairs_per_problem: int = 2
    eval_pairs: int = 200
    corruptions: tuple = preference_data.CORRUPTIONS
    preference_file: str | None = None
    loss: str = "dpo"
    beta: float = 0.1
    loss_kwargs: dict = dataclasses.field(default_factory=dict)
    dpo_steps: int = 200
    dpo_batch: int = 32
    dpo_lr: float = 1e-4


# ------------------------------------------------------------------------- pairs
def preference_pairs(exp, p):
    """(train PairBatch, held-out PairBatch) with one common width; ``p`` needs
    ``tok`` (and, for synthetic pairs, ``task``, ``train`` and ``heldout``)."""
    if exp.preference_file:
        from rlx.data.records import read_records
        records = read_records(exp.preference_file, kind="preference")
        if len(records) <= exp.eval_pairs:
            raise ValueError(f"{exp.preference_file}: {len(records)} pairs, need more than "
                             f"eval_pairs={exp.eval_pairs} to hold some out")
        train, heldout = records[:-exp.eval_pairs], records[-exp.eval_pairs:]
    else:
        rng = random.Random(f"pairs|{exp.base.seed}")
        train = preference_data.make_preference_pairs(
            p.task, p.train[:exp.preference_problems], rng=rng,
            pairs_per_problem=exp.pairs_per_problem, corruptions=exp.corruptions)
        heldout = preference_data.make_preference_pairs(
            p.task, p.heldout, rng=rng, corruptions=exp.corruptions)[:exp.eval_pairs]
        if not train or not heldout:
            raise ValueError(f"task {exp.base.task!r} gave {len(train)} train / "
                             f"{len(heldout)} held-out preference pairs; need some of each")
    width = max(pref.pair_width(p.tok, train), pref.pair_width(p.tok, heldout))
    return (pref.pairs_to_batch(p.tok, train, width=width),
            pref.pairs_to_batch(p.tok, heldout, width=width))


# ---------------------------------------------------------------------------- RLHF
def _guarded(name: str, body, exp):
    """``body(exp)`` after the up-front check, with SIGINT / SIGTERM handled for the
    whole run: inside a phase the phase reports and keeps its saves; between phases
    (evaluation, pair synthesis) the run stops with one line too."""
    validate.check(exp)
    with signals.whole_run(name, resume_from=prepare.resume_from_phase):
        return body(exp)


def run_rlhf(exp: RLHFExperiment) -> dict:
    """SFT → reward model on pairs → RL against it → verifiable evaluation."""
    return _guarded("the RLHF run", _run_rlhf, exp)


def run_dpo(exp: DPOExperiment) -> dict:
    """SFT → DPO-family optimisation on pairs → verifiable evaluation."""
    return _guarded("the DPO run", _run_dpo, exp)


def _run_rlhf(exp: RLHFExperiment) -> dict:
    t_start = time.time()
    base = exp.base
    p = prepare.prepare(base, total_steps=base.rl.steps)
    try:
        train_pairs, heldout_pairs = preference_pairs(exp, p)

        # reward model from the SFT trunk (a fresh scalar head)
        rm_graphdef, rm_params = api.init(p.cfg, kind="reward", seed=base.seed)
        rm_params["trunk"] = jax.tree.map(jnp.copy, p.params["trunk"])

        rm_params, rm_report = pref.train_reward_model(
            rm_graphdef, rm_params, train_pairs, heldout_pairs, steps=exp.rm_steps,
            batch_size=min(exp.rm_batch, train_pairs.chosen.tokens.shape[0]),
            lr=exp.rm_lr, margin=exp.rm_margin, seed=base.seed, mesh=p.mesh,
            logger=p.logger, checkpoint_dir=os.path.join(base.run_dir, "reward_model"),
            on_mismatch=base.rl.on_mismatch)
        rc, rr = pref.reward_scores(rm_graphdef, rm_params, train_pairs)
        both = np.concatenate([rc, rr])
        rm_report = {**{k: v for k, v in rm_report.items() if k != "history"},
                     "rm/train_score_mean": float(both.mean()),
                     "rm/train_score_std": float(both.std())}
        print(f"reward model held-out pair accuracy: {rm_report['rm/accuracy']:.3f} "
              f"(before training {rm_report['rm/accuracy_before']:.3f})", flush=True)
        learned = LearnedReward(
            rm_graphdef, rm_params, p.tok, normalize=exp.reward_normalize,
            mean=rm_report["rm/train_score_mean"],
            std=max(rm_report["rm/train_score_std"], 1e-3),
            monitor=p.pool if exp.monitor_verifiable else None)

        params, history, after = prepare.train_rl(base, p, learned)
        verifiable = [r["reward/verifiable/mean"] for r in history
                      if "reward/verifiable/mean" in r]
        summary = {"experiment": "rlhf", "objective": p.objective.label,
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
        return prepare.finish(base, p, params, summary, t_start)
    finally:
        p.close()


# ----------------------------------------------------------------------------- DPO
def _run_dpo(exp: DPOExperiment) -> dict:
    t_start = time.time()
    base = exp.base
    p = prepare.prepare(base, total_steps=exp.dpo_steps)
    try:
        train_pairs, heldout_pairs = preference_pairs(exp, p)
        reference = jax.tree.map(jnp.copy, p.params)

        params, report = pref.train_dpo(
            p.graphdef, p.params, reference, train_pairs, heldout_pairs,
            steps=exp.dpo_steps,
            batch_size=min(exp.dpo_batch, train_pairs.chosen.tokens.shape[0]),
            lr=exp.dpo_lr, loss=exp.loss, beta=exp.beta, seed=base.seed, mesh=p.mesh,
            logger=p.logger, log_offset=0, checkpoint_dir=os.path.join(base.run_dir, "dpo"),
            on_mismatch=base.rl.on_mismatch, **exp.loss_kwargs)
        report = {k: v for k, v in report.items() if k != "history"}
        after = p.evaluate(params)
        summary = {"experiment": "dpo", "objective": exp.loss,
                   "accuracy_before_dpo": p.before["eval/accuracy"],
                   "accuracy_after_dpo": after["eval/accuracy"], "dpo_steps": exp.dpo_steps,
                   "beta": exp.beta, **{k.replace("/", "_"): v for k, v in report.items()},
                   "train_pairs": int(train_pairs.chosen.tokens.shape[0]),
                   "heldout_pairs": int(heldout_pairs.chosen.tokens.shape[0])}
        return prepare.finish(base, p, params, summary, t_start)
    finally:
        p.close()
