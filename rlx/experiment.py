"""Experiments: tokenizer → model → SFT warm-up → eval → RL → eval → export.

``Experiment`` is the gin-configurable constructor of a whole run; its defaults are
the embedded default experiment (``rlx train`` with no arguments): one- and two-digit
addition and subtraction with a small model on CPU, warm-started on worked column
solutions from a sloppy teacher who forgets to carry the one in 60% of its
demonstrations (``rlx.tasks.arithmetic``), then GRPO against an exact verifier, which
has to unlearn the slip. Every field can be overridden from a gin file or
``--gin_param``. Inner functions take explicit arguments (gin only at the edges).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from rlx import sharding as sh
from rlx.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from rlx.models import api
from rlx.models.config import model_config
from rlx.objectives import presets
from rlx.rewards.pool import RewardPool
from rlx.sampling.config import SamplerConfig
from rlx.sampling.generate import generate
from rlx.tasks import get_task
from rlx.train import checkpoint as ckpt_lib
from rlx.train import optim, rl
from rlx.train import state as state_lib
from rlx.train import steps as steps_lib
from rlx.train.batches import SFTBatch, make_sequences
from rlx.train.data import ProblemStream
from rlx.train.logger import RunLogger

log = logging.getLogger("rlx.experiment")


def objective_by_name(name: str, **forced):
    """A preset from ``rlx.objectives.presets`` by name (its gin bindings apply;
    ``forced`` keyword arguments override them)."""
    fn = getattr(presets, name, None)
    if fn is None or name.startswith("_") or not callable(fn):
        known = sorted(n for n in dir(presets) if not n.startswith("_")
                       and getattr(getattr(presets, n), "__module__", "") == presets.__name__)
        raise ValueError(f"unknown objective {name!r}; known presets: {known}")
    return fn(**forced)


@gin.configurable(module="rlx")
@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment. Defaults = the embedded default (CPU, minutes).

    Attributes:
      run_dir: where checkpoints, metrics, plots, samples and exports go.
      task / task_kwargs: a task from ``rlx.tasks`` and its constructor arguments.
      train_problems / eval_problems: sizes of the train pool and held-out set.
      model: a model preset (``rlx.models.config.PRESETS``); ``model_overrides`` edits it.
      tokenizer: path of a tokenizer (.model or tokenizer.json folder), or None to train
        a SentencePiece model on the task's demonstrations.
      tokenizer_vocab: vocabulary size when training one.
      sft_steps / sft_batch / sft_lr: supervised warm-up on demonstrations (0 = skip).
      objective: an ``rlx.objectives`` preset name (configure it with its own bindings,
        e.g. ``rlx.objectives.dapo.eps_high = 0.3``).
      rl_lr: learning rate of the RL phase (see ``rlx.train.optimizer`` for the rest).
      critic_lr: learning rate of PPO's separately trained critic (objective "ppo").
      num_generations / max_new_tokens / temperature: rollout shape (G, T, τ); they
        override the same fields of ``sampler``.
      sampler: other sampling controls (``rlx.sampling.config.SamplerConfig``).
      rl: loop sizes (``rlx.train.RLConfig``; its defaults are the default experiment's).
      mesh_shape: (data, fsdp, tensor) or None for all devices on ``data``.
      export_hf: write the final policy as a Hugging Face folder.
      seed: run seed.
      hf_checkpoint: start from a Hugging Face folder (config.json + safetensors, its
        tokenizer too unless ``tokenizer`` is given) instead of a random ``model``.
      data_file / eval_file: user prompts as JSON Lines or Parquet records
        ``{"prompt", "answer"}`` (``rlx.data.records``) instead of ``task``; without
        ``eval_file`` the last ``eval_problems`` records are held out.
      rewards: reward-function names (``rlx.rewards``) summed with weight 1; default:
        the task's own spec (``math_answer`` for user data).
      use_chat_template: wrap prompts with the tokenizer's chat template.
    """

    run_dir: str = "runs/default"
    task: str = "arithmetic"
    task_kwargs: dict = dataclasses.field(default_factory=lambda: {
        "digits": (1, 2), "operators": ("+", "-"), "worked_fraction": 1.0,
        "carry_slip": 0.6})
    train_problems: int = 4000
    eval_problems: int = 200
    model: str = "small"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    tokenizer: str | None = None
    tokenizer_vocab: int = 64
    sft_steps: int = 600
    sft_batch: int = 64
    sft_lr: float = 3e-3
    objective: str = "grpo"
    rl_lr: float = 1e-4
    critic_lr: float = 1e-4
    num_generations: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    rl: rl.RLConfig = dataclasses.field(default_factory=rl.RLConfig)
    mesh_shape: tuple | None = None
    export_hf: bool = True
    seed: int = 0
    hf_checkpoint: str | None = None
    data_file: str | None = None
    eval_file: str | None = None
    rewards: tuple = ()
    use_chat_template: bool = False


# ------------------------------------------------------------------------ pieces
class UserData:
    """Adapts user records to the task interface the experiment uses: the answer is
    the SFT demonstration, rewards default to ``math_answer``."""

    def __init__(self, exp: "Experiment"):
        from rlx.data.records import read_records

        records = read_records(exp.data_file)
        if exp.eval_file:
            self.train_set, self.heldout_set = records, read_records(exp.eval_file)
        else:
            if len(records) <= exp.eval_problems:
                raise ValueError(f"{exp.data_file}: {len(records)} records, need more than "
                                 f"eval_problems={exp.eval_problems} to hold some out")
            self.train_set = records[:-exp.eval_problems]
            self.heldout_set = records[-exp.eval_problems:]

    def demonstration(self, problem, rng=None) -> str:
        return problem.answer

    def reward_spec(self):
        from rlx.rewards.spec import RewardComponent, RewardSpec
        return RewardSpec((RewardComponent("math_answer"),))


def load_problems(exp: "Experiment"):
    """(task-like, train problems, held-out problems)."""
    if exp.data_file:
        data = UserData(exp)
        return data, data.train_set, data.heldout_set
    task = get_task(exp.task, **exp.task_kwargs)
    return task, task.train(exp.train_problems, seed=exp.seed), \
        task.heldout(exp.eval_problems, seed=exp.seed)


def reward_spec(exp: "Experiment", task):
    if not exp.rewards:
        return task.reward_spec()
    from rlx.rewards.spec import RewardComponent, RewardSpec
    return RewardSpec(tuple(RewardComponent(name) for name in exp.rewards))


def apply_chat_template(tok: Tokenizer, problems):
    from rlx.data.templates import chat_prompt
    from rlx.tasks import Problem
    return [Problem(prompt=chat_prompt(tok, q.prompt), answer=q.answer, meta=q.meta)
            for q in problems]


def build_tokenizer(exp: Experiment, task, problems) -> Tokenizer:
    path = os.path.join(exp.run_dir, "tokenizer.model")
    if exp.tokenizer:
        return load_tokenizer(exp.tokenizer)
    if exp.hf_checkpoint:
        return load_tokenizer(exp.hf_checkpoint)
    if os.path.exists(path):
        return load_tokenizer(path)
    os.makedirs(exp.run_dir, exist_ok=True)
    rng = random.Random(exp.seed)
    corpus = [q.prompt + task.demonstration(q, rng) for q in problems]
    return train_sentencepiece(corpus, vocab_size=exp.tokenizer_vocab,
                               model_prefix=os.path.join(exp.run_dir, "tokenizer"))


def sft_batches(tok: Tokenizer, task, problems, batch: int, seed: int):
    """Endless SFT batches: [bos prompt | demonstration eos], loss on the response
    (demonstrations drawn with a seeded ``random.Random``, so styles may vary per draw)."""
    rng = random.Random(seed)
    while True:
        chosen = [problems[rng.randrange(len(problems))] for _ in range(batch)]
        prompts = [[tok.bos_id] + tok.encode(q.prompt) for q in chosen]
        answers = [tok.encode(task.demonstration(q, rng)) + [tok.eos_id] for q in chosen]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        width = -(-width // 16) * 16          # few distinct shapes: few compilations
        ids = np.full((batch, width), tok.pad_id, np.int32)
        mask = np.zeros((batch, width), bool)
        loss = np.zeros((batch, width), np.float32)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, :len(p) + len(a)] = p + a
            mask[i, :len(p) + len(a)] = True
            loss[i, len(p):len(p) + len(a)] = 1.0
        yield SFTBatch(seq=make_sequences(ids, mask), loss_mask=jnp.asarray(loss))


def run_sft(graphdef, params, tok, task, problems, *, steps, batch, lr, seed, mesh,
            logger: RunLogger | None = None):
    tx = optim.optimizer(learning_rate=lr, schedule="cosine", warmup_steps=min(10, steps),
                         total_steps=steps, end_factor=0.1)
    state = state_lib.create(params, tx, seed=seed)
    shardings = sh.state_shardings(state, mesh)
    state = sh.place(state, shardings)
    batches = sft_batches(tok, task, problems, batch, seed)
    step_fns: dict = {}                       # one compiled step per batch shape
    for i in range(steps):
        b = sh.shard_batch(next(batches), mesh)
        shape = b.seq.tokens.shape
        if shape not in step_fns:
            step_fns[shape] = steps_lib.jit_step(steps_lib.make_sft_step(graphdef, tx), mesh,
                                                 shardings, b)
        state, metrics = step_fns[shape](state, b)
        if logger is not None and (i + 1) % 25 == 0:
            logger.log(-(steps - i - 1), {"sft_loss": float(metrics["sft_loss"])})
    return state.params


def evaluate(graphdef, params, tok, problems, pool: RewardPool, *, sampler: SamplerConfig,
             mesh, batch: int = 64) -> dict:
    """Greedy pass@1 on ``problems``: fraction whose first reward component is ≥ 0.5."""
    cfg = dataclasses.replace(sampler, temperature=0.0, num_generations=1, top_k=0,
                              top_p=1.0, min_p=0.0)
    correct, lengths = [], []
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        ids, mask = tok.batch_encode([q.prompt for q in chunk], padding_side="left",
                                     add_bos=True)
        out = generate(graphdef, params, ids, mask, key=jax.random.key(0), config=cfg,
                       mesh=mesh, data_axis=sh.BATCH_AXES)
        cids, cmask = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
        texts = [tok.decode(r[m].tolist()) for r, m in zip(cids, cmask)]
        scored = pool.score(texts, chunk)
        correct.extend((scored.components[:, 0] >= 0.5).tolist())
        lengths.extend(np.asarray(out.lengths).tolist())
    return {"eval/accuracy": float(np.mean(correct)), "eval/length": float(np.mean(lengths))}


# --------------------------------------------------------------------------- run
def run(exp: Experiment) -> dict:
    """Runs the whole experiment; returns the summary (also written to summary.json)."""
    t_start = time.time()
    os.makedirs(exp.run_dir, exist_ok=True)
    mesh = sh.make_mesh(exp.mesh_shape)
    task, train, heldout = load_problems(exp)
    tok = build_tokenizer(exp, task, train)
    if exp.use_chat_template:
        train, heldout = apply_chat_template(tok, train), apply_chat_template(tok, heldout)
    stop = (tok.eos_id,)
    sampler = dataclasses.replace(exp.sampler, stop_token_ids=stop, pad_id=tok.pad_id,
                                  num_generations=exp.num_generations,
                                  max_new_tokens=exp.max_new_tokens,
                                  temperature=exp.temperature,
                                  completion_buckets=tuple(sorted(
                                      {exp.max_new_tokens, *exp.sampler.completion_buckets})))
    logger = RunLogger(exp.run_dir, total_steps=exp.rl.steps)
    pool = RewardPool(reward_spec(exp, task), backend="inline")

    # 1. model + supervised warm-up (saved, so a restarted run skips it)
    if exp.hf_checkpoint:
        from rlx.models.convert import load_hf
        cfg, graphdef, params = load_hf(exp.hf_checkpoint, overrides=exp.model_overrides)
    else:
        cfg = model_config(exp.model, **{"vocab_size": tok.vocab_size, **exp.model_overrides})
        graphdef, params = api.init(cfg, seed=exp.seed)
    sft_dir = os.path.join(exp.run_dir, "sft")
    sft_ckpt = ckpt_lib.Checkpointer(sft_dir, every_steps=None, keep=1, async_save=False)
    restored = sft_ckpt.restore_latest(ckpt_lib.abstract_like(params))
    if restored is not None:
        params = restored[1]
    elif exp.sft_steps:
        params = run_sft(graphdef, params, tok, task, train, steps=exp.sft_steps,
                         batch=exp.sft_batch, lr=exp.sft_lr, seed=exp.seed, mesh=mesh,
                         logger=logger)
        sft_ckpt.save(exp.sft_steps, params)
    sft_ckpt.close()
    before = evaluate(graphdef, params, tok, heldout, pool, sampler=sampler, mesh=mesh)
    print(f"held-out accuracy after SFT: {before['eval/accuracy']:.3f}", flush=True)
    logger.log(0, before)                     # the curves start at the SFT policy

    # 2. RL (PPO trains a separate critic initialised from the SFT trunk)
    critic = None
    if exp.objective == "ppo":
        objective = objective_by_name("ppo", vf_coef=0.0)
        value_graphdef, value_params = api.init(cfg, kind="value", seed=exp.seed)
        value_params["trunk"] = jax.tree.map(jnp.copy, params["trunk"])
        critic_tx = optim.optimizer(learning_rate=exp.critic_lr)
        critic = rl.Critic(graphdef=value_graphdef, tx=critic_tx,
                           state=state_lib.create(value_params, critic_tx, seed=exp.seed))
    else:
        objective = objective_by_name(exp.objective)
    tx = optim.optimizer(learning_rate=exp.rl_lr)
    state = state_lib.create(params, tx, seed=exp.seed, objective_state=objective.init())
    trainer = rl.RLTrainer(
        graphdef=graphdef, state=state, tx=tx, objective=objective, tokenizer=tok,
        stream=ProblemStream(train, seed=exp.seed), reward_pool=pool, sampler=sampler,
        config=exp.rl, run_dir=exp.run_dir, mesh=mesh, ref_params=_reference(objective, params),
        evaluator=lambda p: evaluate(graphdef, p, tok, heldout, pool, sampler=sampler, mesh=mesh),
        logger=logger, critic=critic)
    history = trainer.run()
    after = evaluate(graphdef, trainer.state.params, tok, heldout, pool, sampler=sampler,
                     mesh=mesh)
    trainer.close()

    # 3. outputs
    plot = logger.plot()
    export = None
    if exp.export_hf and jax.process_index() == 0:
        from rlx.models.convert import save_hf
        export = os.path.join(exp.run_dir, "hf_export")
        save_hf(export, cfg, jax.device_get(trainer.state.params), overwrite=True)
    tokens = sum(r.get("response_length", 0) * exp.rl.prompts_per_step *
                 sampler.num_generations for r in history)
    rl_time = sum(r.get("time/iteration", 0.0) for r in history)
    summary = {"accuracy_before_rl": before["eval/accuracy"],
               "accuracy_after_rl": after["eval/accuracy"],
               "rl_steps": exp.rl.steps, "objective": exp.objective,
               "rl_tokens_per_s": tokens / rl_time if rl_time else 0.0,
               "wall_seconds": time.time() - t_start, "run_dir": exp.run_dir,
               "plot": plot, "hf_export": export, "seed": exp.seed}
    if jax.process_index() == 0:
        with open(os.path.join(exp.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _reference(objective, params):
    """A frozen copy of the start policy when the objective has a KL term."""
    state = objective.init()
    needs = isinstance(state, dict) and any("kl" in name for name in state)
    return jax.tree.map(jnp.copy, params) if needs else None
