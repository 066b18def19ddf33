"""The default experiment: tokenizer → model → SFT warm-up → eval → RL → eval → export.

``Experiment`` (gin: ``rlx.Experiment``) is the gin-configurable constructor of a
whole run; its defaults are the embedded default experiment (``rlx train`` with no
arguments): one- and two-digit addition and subtraction with a small model on CPU,
warm-started on worked column solutions from a sloppy teacher who forgets to carry the
one in 60% of its demonstrations (``rlx.tasks.arithmetic``), then GRPO against an exact
verifier, which has to unlearn the slip. Every field can be overridden from a gin file
or ``--gin_param``; ``run`` is the recipe, built from the shared steps of
``rlx.recipes.prepare``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import gin

from rlx.recipes import prepare
from rlx.sampling.config import SamplerConfig
from rlx.train import rl, signals


@gin.configurable(module="rlx")
@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment. Defaults = the embedded default (CPU, minutes).

    Each setting has one owner: where this class names a setting (learning rates,
    rollout shape, mesh), the lower-level parameter it sets (``rlx.train.optimizer``'s
    ``learning_rate``, ``SamplerConfig.temperature``, ...) cannot be bound as well; a run
    refuses such bindings before building anything (``rlx.recipes.bindings``).

    **Two modes, one set of fields.** The fields marked *mode default* are None unless
    set, and None means the default of the run's mode (``resolved()``; every recipe
    step reads the resolved values, and an explicit setting always wins):

      ==================  =========================  ===================================
      field               random ``model`` (toy)     ``hf_checkpoint`` (pretrained)
      ==================  =========================  ===================================
      sft_steps           600                        0 (no SFT unless asked)
      sft_lr              3e-3                       1e-5
      rl_lr               1e-4                       1e-6
      critic_lr           1e-4                       1e-5
      max_new_tokens      32                         1024, capped by the largest
                                                     ``sampler.completion_buckets``
      use_chat_template   False                      True when the checkpoint's tokenizer
                                                     has a chat template
      model_overrides     as given                   ``{"dtype": "bfloat16"}`` (bf16
                                                     compute, float32 master weights)
                                                     under the given ones
      ==================  =========================  ===================================

    Attributes:
      run_dir: where checkpoints, metrics, plots, samples and exports go.
      task: a registered task name (``rlx.tasks.available_tasks()``), a dotted import
        path to a ``Task`` class or factory (``"my_pkg.tasks.MyTask"``), or a ``Task``
        (a gin reference ``@my_pkg.MyTask()``).
      task_kwargs: the task's constructor arguments; None means the default
        experiment's (``prepare.DEFAULT_TASK_KWARGS``) for ``"arithmetic"`` and none for
        any other task.
      train_problems / eval_problems: sizes of the train pool and held-out set.
      model: a model preset (``rlx.models.config.PRESETS``); ``model_overrides`` edits it
        (or the ``hf_checkpoint``'s config; mode default above).
      tokenizer: path of a tokenizer (.model or tokenizer.json folder), or None to train
        a SentencePiece model on the task's demonstrations.
      tokenizer_vocab: vocabulary size when training one.
      sft_steps / sft_batch / sft_lr: supervised warm-up on demonstrations (0 = skip;
        steps and lr: mode defaults).
      objective: a preset name of ``rlx.objectives`` (configure it with its own
        bindings, e.g. ``rlx.objectives.dapo.eps_high = 0.3``), a dotted import path
        ``"my_pkg.my_objective"`` to an ``Objective`` or a function returning one, or an
        ``Objective`` (a gin reference ``@my_pkg.my_objective()``);
        ``rlx.recipes.components``. ``"ppo"`` trains a separate critic.
      rl_lr: learning rate of the RL phase (mode default; the other AdamW settings:
        ``rlx.train.optimizer``).
      critic_lr: learning rate of PPO's separately trained critic (mode default).
      num_generations / max_new_tokens / temperature: rollout shape (G, T, τ); the
        owners of the same fields of ``sampler`` (T: mode default).
      sampler: the other sampling controls (``rlx.sampling.config.SamplerConfig``:
        top_k, top_p, min_p, prefix_cache, buckets, ...; its ``stop_token_ids`` are
        added to the tokenizer's stop ids).
      rl: loop sizes (``rlx.train.RLConfig``; its defaults are the default experiment's).
      mesh_shape: (data, fsdp, tensor) or None for all devices on ``data`` (partition
        rules: ``rlx.sharding.partition_rules``). Parameters are read or created in
        their shards, the optimizer state and the KL reference too.
      export_hf: write the final policy as a Hugging Face folder (``<run_dir>/hf_export``,
        with the tokenizer files, bos/eos/pad ids and generation_config.json; the
        checkpoint's tensor dtype when it names one, else float32).
      seed: the run's one seed (problems, tokenizer corpus, init, SFT order, data
        order; the RL sampling keys derive from the training state's key).
      hf_checkpoint: start from a Hugging Face folder (config.json + safetensors, its
        tokenizer too unless ``tokenizer`` is given) instead of a random ``model``;
        switches the mode defaults above to the pretrained column.
      data_file / eval_file: user prompts as JSON Lines or Parquet records
        ``{"prompt", "answer"}`` (``rlx.data.records``) instead of ``task``; without
        ``eval_file`` the last ``eval_problems`` records are held out.
      rewards: reward functions (registry names or import paths) built with
        ``rlx.rewards.reward_spec`` (bind its ``weights`` / ``kwargs``), or a
        ``RewardSpec``; empty: the task's own spec (``math_answer`` for user data).
      use_chat_template: wrap prompts with the tokenizer's chat template (mode default).
    """

    run_dir: str = "runs/default"
    task: Any = "arithmetic"
    task_kwargs: dict | None = None
    train_problems: int = 4000
    eval_problems: int = 200
    model: str = "small"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    tokenizer: str | None = None
    tokenizer_vocab: int = 64
    sft_steps: int | None = None
    sft_batch: int = 64
    sft_lr: float | None = None
    objective: Any = "grpo"
    rl_lr: float | None = None
    critic_lr: float | None = None
    num_generations: int = 8
    max_new_tokens: int | None = None
    temperature: float = 1.0
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    rl: rl.RLConfig = dataclasses.field(default_factory=rl.RLConfig)
    mesh_shape: tuple | None = None
    export_hf: bool = True
    seed: int = 0
    hf_checkpoint: str | None = None
    data_file: str | None = None
    eval_file: str | None = None
    rewards: Any = ()
    use_chat_template: bool | None = None

    def resolved(self) -> "Experiment":
        """This experiment with every *mode default* left None filled in (the table
        above); ``use_chat_template`` stays None in the pretrained mode until the
        tokenizer is known (``rlx.recipes.prepare.chat_template_on``). Idempotent."""
        pretrained = bool(self.hf_checkpoint)
        defaults = PRETRAINED_DEFAULTS if pretrained else TOY_DEFAULTS
        changes = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if "max_new_tokens" in changes:
            changes["max_new_tokens"] = min(changes["max_new_tokens"],
                                            max(self.sampler.completion_buckets))
        if pretrained and "dtype" not in self.model_overrides:
            changes["model_overrides"] = {"dtype": "bfloat16", **self.model_overrides}
        if not pretrained and self.use_chat_template is None:
            changes["use_chat_template"] = False
        return dataclasses.replace(self, **changes) if changes else self


#: mode defaults of ``Experiment`` (see its docstring): a random ``model`` (the
#: embedded toy experiment) and an ``hf_checkpoint`` (a pretrained model).
TOY_DEFAULTS = {"sft_steps": 600, "sft_lr": 3e-3, "rl_lr": 1e-4, "critic_lr": 1e-4,
                "max_new_tokens": 32}
PRETRAINED_DEFAULTS = {"sft_steps": 0, "sft_lr": 1e-5, "rl_lr": 1e-6, "critic_lr": 1e-5,
                       "max_new_tokens": 1024}


def run(exp: Experiment) -> dict:
    """Runs the whole experiment; returns the summary (also written to summary.json).

    Settings, objective and task are checked before anything is written or compiled.
    A SIGINT / SIGTERM anywhere in it (start-up, the SFT warm-up, the evaluations, the
    RL phase, the export) stops the run with one line and keeps every finished save
    (``signals.whole_run``).
    """
    with signals.whole_run("the experiment", resume_from=prepare.resume_from_phase):
        return _run(exp)


def _run(exp: Experiment) -> dict:
    t_start = time.time()
    exp = exp.resolved()
    planned = prepare.plan(exp)
    p = prepare.prepare(exp, total_steps=exp.rl.steps, planned=planned)
    try:
        params, history, after = prepare.train_rl(exp, p, p.pool)
        tokens = sum(r.get("response_length", 0) * exp.rl.prompts_per_step *
                     p.sampler.num_generations for r in history)
        rl_time = sum(r.get("time/iteration", 0.0) for r in history)
        summary = {"accuracy_before_rl": p.before["eval/accuracy"],
                   "accuracy_after_rl": after["eval/accuracy"],
                   "rl_steps": exp.rl.steps, "objective": p.objective.label,
                   "rl_tokens_per_s": tokens / rl_time if rl_time else 0.0}
        return prepare.finish(exp, p, params, summary, t_start)
    finally:
        p.close()
