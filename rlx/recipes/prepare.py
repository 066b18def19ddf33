"""What every recipe shares: settings, problems, tokenizer, model, SFT warm-up,
evaluation, reward pool, reference policy, the RL phase and the run's outputs.

A recipe (``rlx.recipes.experiment``, ``rlx.recipes.rlhf``) reads top to bottom as

    plan = prepare.plan(exp)                       # cheap; fails fast on bad settings
    p = prepare.prepare(exp, planned=plan, total_steps=...)  # tokenizer, model, SFT, eval
    ... its own phase (RL against a verifier, a reward model, DPO) ...
    prepare.finish(exp, p, params, summary, t_start)

``plan`` resolves the objective and the task (names, import paths, gin references;
``rlx.recipes.components``) and refuses settings that would be ignored
(``rlx.recipes.bindings``) before anything is written, trained or compiled. ``exp`` is
an ``rlx.recipes.experiment.Experiment`` (the shared settings; the RLHF and DPO recipes
keep theirs in ``.base``); every step reads its *resolved* settings
(``Experiment.resolved()``: the mode defaults of a random model or a pretrained
``hf_checkpoint``).

Memory: a checkpoint is read straight into its shards (``rlx.models.convert.load_hf``
with the mesh), the optimizer state is created in its shards
(``jax.jit(tx.init, out_shardings=...)``, ``make_state``) and so is the KL reference
(``reference_params``), so no device and no host ever holds a whole sharded tensor.

Several hosts: every process runs the same recipe on the same data (the CLI starts
``jax.distributed``, ``rlx.sharding.init_distributed``); a trained tokenizer is
trained on process 0 and broadcast, evaluation and export gather the arrays that span
processes (``rlx.sharding.host_value``), and only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlx import sharding as sh
from rlx.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from rlx.models import api
from rlx.models import config as model_lib
from rlx.objectives import presets
from rlx.recipes import bindings, validate
from rlx.recipes.components import ResolvedObjective, resolve_objective, resolve_task
from rlx.recipes.sft import prompt_bos, run_sft
from rlx.rewards import spec as spec_lib
from rlx.rewards.pool import RewardPool
from rlx.sampling.config import SamplerConfig
from rlx.sampling.generate import generate
from rlx.tasks import registry
from rlx.tasks.base import Task
from rlx.train import checkpoint as ckpt_lib
from rlx.train import async_rl, optim, rl
from rlx.train import state as state_lib
from rlx.train.data import ProblemStream
from rlx.train.logger import RunLogger

# SamplerConfig fields the recipe sets from its own settings (see ``make_sampler``).
SAMPLER_OWNERS = {
    "num_generations": "rlx.Experiment.num_generations",
    "max_new_tokens": "rlx.Experiment.max_new_tokens",
    "temperature": "rlx.Experiment.temperature",
    "pad_id": "the tokenizer's pad id",
}


def resume_from_phase() -> str:
    """What a rerun of a stopped multi-phase run resumes from (``signals.whole_run``)."""
    return "the newest checkpoint of the phase it was in (finished phases are kept)"



# ---------------------------------------------------------------------- settings
def ownership_rules(exp, *, task_factory=None, resolved: ResolvedObjective | None = None
                    ) -> list[bindings.Owned]:
    """The parameters a run of ``exp`` sets itself (``rlx.recipes.bindings``)."""
    from rlx.data import records

    Owned = bindings.Owned
    rules = [
        Owned(records.records_dataset, None,
              "the recipes read rlx.Experiment.data_file / eval_file with "
              "rlx.data.records.read_records (records_dataset is for your own pipelines)"),
        Owned(optim.optimizer, optim.PHASE_PARAMETERS,
              "learning rates are rlx.Experiment.rl_lr / sft_lr / critic_lr "
              "(rlx.RLHFExperiment.rm_lr, rlx.DPOExperiment.dpo_lr) and each phase sets "
              "its schedule (rlx.train.optim.constant for RL, warmup_cosine for SFT / "
              "reward model / DPO)"),
        *(Owned(SamplerConfig, (field,), owner) for field, owner in SAMPLER_OWNERS.items()),
        Owned(RewardPool, ("spec",), "rlx.Experiment.rewards (or the task's reward spec)"),
        Owned(registry.get_task, None,
              "the task is rlx.Experiment.task, its arguments rlx.Experiment.task_kwargs"),
    ]
    if exp.hf_checkpoint:
        rules.append(Owned(model_lib.model_config, None,
                           "the model comes from rlx.Experiment.hf_checkpoint; change its "
                           "fields with rlx.Experiment.model_overrides"))
    else:
        rules += [Owned(model_lib.model_config, ("preset",), "rlx.Experiment.model"),
                  Owned(model_lib.model_config, ("vocab_size",),
                        "the tokenizer's vocabulary size")]
        if exp.model_overrides:
            rules.append(Owned(model_lib.model_config, tuple(exp.model_overrides),
                               f"rlx.Experiment.model_overrides = {dict(exp.model_overrides)}"))
    if not exp.rewards:
        rules.append(Owned(spec_lib.reward_spec, None,
                           "rlx.Experiment.rewards is empty, so the task's own reward spec "
                           "is used; list the rewards in rlx.Experiment.rewards to build "
                           "them with rlx.rewards.reward_spec"))
    elif not isinstance(exp.rewards, spec_lib.RewardSpec):
        rules.append(Owned(spec_lib.reward_spec, ("names",), "rlx.Experiment.rewards"))
    kwargs = task_kwargs(exp)
    if task_factory is not None and kwargs:
        rules.append(Owned(task_factory, tuple(kwargs),
                           f"rlx.Experiment.task_kwargs = {kwargs} passes it"))
    if resolved is not None and resolved.label == "ppo":
        rules.append(Owned(presets.ppo, ("vf_coef",),
                           "a separately trained critic learns the values "
                           "(rlx.Experiment.critic_lr), so ppo is built with vf_coef = 0"))
    return rules


def _sampler_values(exp) -> list[str]:
    """Fields of ``exp.sampler`` set away from their defaults in Python (not by gin,
    which the rules catch) that ``make_sampler`` would replace."""
    defaults = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
    gin_bound = bindings.bound(SamplerConfig)
    return [f"Experiment.sampler.{field}={getattr(exp.sampler, field)!r} would be replaced: "
            f"{owner} sets it" for field, owner in SAMPLER_OWNERS.items()
            if field not in gin_bound and getattr(exp.sampler, field) != defaults[field]]


def check_settings(exp, *, task_factory=None, resolved: ResolvedObjective | None = None,
                   extra_rules=()) -> None:
    """Raises ValueError when a gin binding or a field of ``exp`` would be ignored."""
    bindings.check([*ownership_rules(exp, task_factory=task_factory, resolved=resolved),
                    *extra_rules], extra=_sampler_values(exp))


def settled(exp):
    """``exp`` with its mode defaults filled in (``Experiment.resolved()``)."""
    return exp.resolved() if hasattr(exp, "resolved") else exp


# ------------------------------------------------------------------------ problems
#: the embedded default experiment's task: worked column solutions from a sloppy
#: teacher who forgets the carry in 60% of its demonstrations.
DEFAULT_TASK_KWARGS = {"digits": (1, 2), "operators": ("+", "-"), "worked_fraction": 1.0,
                       "carry_slip": 0.6}


def task_kwargs(exp) -> dict:
    """``exp.task_kwargs``; None means ``DEFAULT_TASK_KWARGS`` for the default task
    ``"arithmetic"`` and no arguments (the task's own defaults) for any other."""
    if exp.task_kwargs is not None:
        return dict(exp.task_kwargs)
    return dict(DEFAULT_TASK_KWARGS) if exp.task == "arithmetic" else {}

class UserData:
    """Adapts user records to the task interface the recipes use: the answer is the SFT
    demonstration, rewards default to ``math_answer``."""

    def __init__(self, exp):
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
        return spec_lib.RewardSpec((spec_lib.RewardComponent("math_answer"),))


def reward_spec_for(exp, task) -> spec_lib.RewardSpec:
    """``Experiment.rewards``: empty → the task's spec; a RewardSpec → itself; names
    (registry names or import paths) → ``rlx.rewards.reward_spec(names)``, whose gin
    bindings (``weights``, ``kwargs``, ...) apply."""
    if isinstance(exp.rewards, spec_lib.RewardSpec):
        return exp.rewards
    if not exp.rewards:
        return task.reward_spec()
    return spec_lib.reward_spec(names=tuple(exp.rewards))


@dataclasses.dataclass
class Plan:
    """What a run settles before any heavy work (all cheap, all fail fast)."""

    mesh: Any
    task: Any                      # an rlx.tasks.Task or UserData
    train: list
    heldout: list
    objective: ResolvedObjective
    spec: spec_lib.RewardSpec


def plan(exp, *, extra_rules=()) -> Plan:
    """Objective, task, settings check, mesh, problems and reward spec of ``exp``."""
    exp = settled(exp)
    validate.check(exp)            # every size, rate, path and name, before any work
    resolved = resolve_objective(exp.objective)
    factory = None
    if not exp.data_file and not isinstance(exp.task, Task):
        factory = registry.task_factory(exp.task)
    check_settings(exp, task_factory=factory, resolved=resolved, extra_rules=extra_rules)
    mesh = sh.make_mesh(exp.mesh_shape)
    if not exp.hf_checkpoint:      # preset and override names, checked before any training
        model_config_for(exp, exp.tokenizer_vocab)
    if exp.data_file:
        task = UserData(exp)
        train, heldout = task.train_set, task.heldout_set
    else:
        task = resolve_task(exp.task, task_kwargs(exp))
        train = task.train(exp.train_problems, seed=exp.seed)
        heldout = task.heldout(exp.eval_problems, seed=exp.seed)
    return Plan(mesh, task, train, heldout, resolved, reward_spec_for(exp, task))


# ----------------------------------------------------- tokenizer, sampler, model
def build_tokenizer(exp, task, problems) -> Tokenizer:
    """``exp.tokenizer``, else the checkpoint's, else one trained (and kept in the run
    directory) on prompts + demonstrations. Several processes: process 0 loads or
    trains the SentencePiece model and every process uses its bytes (one tokenizer for
    all, whether or not the run directory is shared)."""
    path = os.path.join(exp.run_dir, "tokenizer.model")
    if exp.tokenizer:
        return load_tokenizer(exp.tokenizer)
    if exp.hf_checkpoint:
        return load_tokenizer(exp.hf_checkpoint)

    def local():
        if os.path.exists(path):
            return load_tokenizer(path)
        os.makedirs(exp.run_dir, exist_ok=True)
        rng = random.Random(exp.seed)
        corpus = [q.prompt + task.demonstration(q, rng) for q in problems]
        return train_sentencepiece(corpus, vocab_size=exp.tokenizer_vocab,
                                   model_prefix=os.path.join(exp.run_dir, "tokenizer"))

    if jax.process_count() == 1:
        return local()
    from rlx.data.tokenizer import SentencePieceTokenizer
    proto = local().model_proto if jax.process_index() == 0 else None
    return SentencePieceTokenizer(sh.broadcast_bytes(proto))


def chat_template_on(exp, tok) -> bool:
    """``exp.use_chat_template``; None (the pretrained mode's default) means: when the
    checkpoint's tokenizer has a chat template of its own (an HF tokenizer folder whose
    ``tokenizer_config.json`` / ``chat_template.jinja`` defines one)."""
    exp = settled(exp)
    if exp.use_chat_template is not None:
        return bool(exp.use_chat_template)
    from rlx.data.tokenizer import HFTokenizer
    return isinstance(tok, HFTokenizer) and bool(tok.chat_template)


def apply_chat_template(tok: Tokenizer, problems):
    from rlx.data.templates import chat_prompt
    from rlx.tasks import Problem
    return [Problem(prompt=chat_prompt(tok, q.prompt), answer=q.answer, meta=q.meta)
            for q in problems]


def stop_ids(tok) -> tuple[int, ...]:
    """The ids generation stops on: ``tok.stop_ids`` (the checkpoint's eos list), else eos."""
    ids = getattr(tok, "stop_ids", None)
    if ids is None:
        ids = () if tok.eos_id is None else (tok.eos_id,)
    return tuple(int(i) for i in ids)


def make_sampler(exp, tok) -> SamplerConfig:
    """``exp.sampler`` with the rollout shape of ``exp`` (G, T, τ), the tokenizer's pad
    id, its stop ids plus any bound ``stop_token_ids``, and T among the completion
    buckets."""
    exp = settled(exp)
    s = exp.sampler
    return dataclasses.replace(
        s, stop_token_ids=tuple(dict.fromkeys(stop_ids(tok) + tuple(s.stop_token_ids))),
        pad_id=tok.pad_id, num_generations=exp.num_generations,
        max_new_tokens=exp.max_new_tokens, temperature=exp.temperature,
        completion_buckets=tuple(sorted({exp.max_new_tokens, *s.completion_buckets})))


def model_config_for(exp, vocab_size: int) -> model_lib.ModelConfig:
    """The preset ``exp.model`` at ``vocab_size`` with ``exp.model_overrides``."""
    return model_lib.model_config(exp.model, **{"vocab_size": vocab_size,
                                                **exp.model_overrides})


def build_model(exp, vocab_size: int, mesh=None):
    """(cfg, graphdef, params): ``exp.hf_checkpoint`` loaded, else a random preset.

    With a ``mesh`` the parameters end up in their shards (``rlx.sharding`` partition
    rules): a checkpoint is read straight into them (each device's slice only,
    ``load_hf(mesh=...)``); a random preset is initialised as without a mesh (so its
    values do not depend on the mesh) and then placed."""
    exp = settled(exp)
    if exp.hf_checkpoint:
        from rlx.models.convert import load_hf
        return load_hf(exp.hf_checkpoint, overrides=exp.model_overrides, mesh=mesh)
    cfg = model_config_for(exp, vocab_size)
    graphdef, params = api.init(cfg, seed=exp.seed)
    if mesh is not None:
        params = sh.place(params, sh.param_shardings(params, mesh))
    return cfg, graphdef, params


# ---------------------------------------------------------------------- evaluation
def evaluate(graphdef, params, tok, problems, pool, *, sampler: SamplerConfig, mesh,
             batch: int = 64) -> dict:
    """Greedy pass@1 on ``problems``: fraction whose first reward component is ≥ 0.5,
    and the mean completion length."""
    cfg = dataclasses.replace(sampler, temperature=0.0, num_generations=1, top_k=0,
                              top_p=1.0, min_p=0.0)
    bos = prompt_bos(tok)
    correct, lengths = [], []
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        ids, mask = tok.batch_encode([q.prompt for q in chunk], padding_side="left",
                                     add_bos=bos)
        out = generate(graphdef, params, ids, mask, key=jax.random.key(0), config=cfg,
                       mesh=mesh, data_axis=sh.BATCH_AXES)
        # host_value: on several hosts the outputs span processes (a collective).
        cids, cmask, lens = sh.host_value((out.completion_ids, out.completion_mask,
                                           out.lengths))
        texts = [tok.decode(r[m].tolist()) for r, m in zip(cids, cmask)]
        scored = pool.score(texts, chunk)
        correct.extend((scored.components[:, 0] >= 0.5).tolist())
        lengths.extend(lens.tolist())
    return {"eval/accuracy": float(np.mean(correct)), "eval/length": float(np.mean(lengths))}


def cached(directory: str, like, compute, *, skip: bool = False, step: int = 1,
           identity: dict | None = None, on_mismatch: str = "error"):
    """(params, extra): restored from ``directory`` when saved, else ``compute()``
    (returning params or (params, report)) and saved with the report as ``extra``;
    ``skip`` returns ``(like, {})`` when nothing is saved. ``identity`` (plain data:
    what the saved params are the result of) is recorded with the save; a saved
    result of another identity is refused as ``on_mismatch`` says
    (``rlx.train.checkpoint.Checkpointer``). Restored arrays keep ``like``'s
    shardings."""
    ckpt = ckpt_lib.Checkpointer(directory, every_steps=None, keep=1, async_save=False,
                                 identity=identity, on_mismatch=on_mismatch)
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


# ------------------------------------------------------------------------ prepare
@dataclasses.dataclass
class Prepared:
    """A plan plus the tokenizer, sampler, verifier pool, logger and SFT policy."""

    plan: Plan
    tok: Any
    train: list
    heldout: list
    sampler: SamplerConfig
    pool: RewardPool
    logger: RunLogger
    cfg: Any
    graphdef: Any
    params: Any
    before: dict

    @property
    def mesh(self):
        return self.plan.mesh

    @property
    def task(self):
        return self.plan.task

    @property
    def objective(self) -> ResolvedObjective:
        return self.plan.objective

    def evaluate(self, params) -> dict:
        return evaluate(self.graphdef, params, self.tok, self.heldout, self.pool,
                        sampler=self.sampler, mesh=self.mesh)

    def close(self) -> None:
        self.pool.close()
        self.logger.close()


def model_identity(exp) -> dict:
    """What the model of ``exp`` is: its checkpoint folder or preset, and the overrides
    given (plain data for checkpoint identities)."""
    exp = settled(exp)
    source = {"hf_checkpoint": exp.hf_checkpoint} if exp.hf_checkpoint else \
        {"model": exp.model, "tokenizer_vocab": exp.tokenizer_vocab}
    return {**source, "model_overrides": dict(exp.model_overrides),
            "tokenizer": exp.tokenizer, "seed": exp.seed}


def _name(value) -> str:
    """A label for a setting that may be a name, an import path or a built object."""
    return value if isinstance(value, str) else type(value).__name__


def data_identity(exp) -> dict:
    exp = settled(exp)
    if exp.data_file:
        return {"data_file": exp.data_file, "eval_file": exp.eval_file}
    return {"task": _name(exp.task), "task_kwargs": task_kwargs(exp),
            "train_problems": exp.train_problems}


def sft_identity(exp, chat: bool) -> dict:
    """What the SFT result under ``<run_dir>/sft`` is the result of."""
    exp = settled(exp)
    return {"phase": "sft", **model_identity(exp), **data_identity(exp),
            "sft_steps": exp.sft_steps, "sft_batch": exp.sft_batch, "sft_lr": exp.sft_lr,
            "chat_template": chat}


def prepare(exp, *, total_steps: int, planned: Plan | None = None) -> Prepared:
    """Tokenizer, sampler, verifier pool, logger, model (in its shards), SFT warm-up
    (saved under ``<run_dir>/sft`` with its identity and reused by a restarted run) and
    its held-out evaluation (logged at step 0, where the curves start)."""
    exp = settled(exp)
    pl = plan(exp) if planned is None else planned
    pool = RewardPool(pl.spec)          # its settings are checked before any training
    logger = None
    try:
        os.makedirs(exp.run_dir, exist_ok=True)
        tok = build_tokenizer(exp, pl.task, pl.train)
        train, heldout = pl.train, pl.heldout
        chat = chat_template_on(exp, tok)
        if chat:
            train, heldout = apply_chat_template(tok, train), apply_chat_template(tok, heldout)
        sampler = make_sampler(exp, tok)
        logger = RunLogger(exp.run_dir, total_steps=total_steps)
        cfg, graphdef, params = build_model(exp, tok.vocab_size, mesh=pl.mesh)
        params = cached(os.path.join(exp.run_dir, "sft"), params, lambda: run_sft(
            graphdef, params, tok, pl.task, train, steps=exp.sft_steps,
            batch=exp.sft_batch, lr=exp.sft_lr, seed=exp.seed, mesh=pl.mesh, logger=logger,
            checkpoint_dir=os.path.join(exp.run_dir, "sft_progress")),
            skip=not exp.sft_steps, step=exp.sft_steps, identity=sft_identity(exp, chat),
            on_mismatch=exp.rl.on_mismatch)[0]
        p = Prepared(pl, tok, train, heldout, sampler, pool, logger, cfg, graphdef, params, {})
        p.before = p.evaluate(params)
    except BaseException:
        pool.close()
        if logger is not None:
            logger.close()
        raise
    if jax.process_index() == 0:
        print(f"held-out accuracy after SFT: {p.before['eval/accuracy']:.3f}", flush=True)
    logger.log(0, p.before)
    return p


# ------------------------------------------------------------------------ RL phase
def _wants_reference(objective) -> bool:
    needs = getattr(objective, "needs", None)
    if needs is not None:
        return "ref_logp" in needs
    state = objective.init()
    return isinstance(state, dict) and any("kl" in name for name in state)


def reference_params(objective, params, mesh=None):
    """A frozen copy of the start policy when the objective reads reference log-probs
    (``"ref_logp"`` in ``objective.needs``; objectives without ``needs``: a KL term in
    their state), else None. With a ``mesh`` the copy is made in the parameters'
    shards (``rlx.sharding.place``: fresh buffers, device by device)."""
    if not _wants_reference(objective):
        return None
    if mesh is None:
        return jax.tree.map(jnp.copy, params)
    return sh.place(params, sh.param_shardings(params, mesh))


def make_state(params, tx, mesh=None, *, seed: int, objective_state=None
               ) -> state_lib.TrainState:
    """``state.create`` with the optimizer state created in its shards: with a ``mesh``
    ``jax.jit(tx.init, out_shardings=...)`` (the moments mirror the parameters'
    partition specs), so no device ever holds a whole moment."""
    if mesh is None:
        return state_lib.create(params, tx, seed=seed, objective_state=objective_state)
    opt_shardings = sh.param_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    # step, key and objective state as state.create makes them (identity: no moments)
    return state_lib.create(params, optax.identity(), seed=seed,
                            objective_state=objective_state).replace(opt_state=opt_state)


def rl_optimizer(exp):
    """The RL phase's optimizer: ``rlx.train.optimizer`` at ``exp.rl_lr``, constant."""
    return optim.constant(settled(exp).rl_lr)


def make_critic(exp, cfg, params, mesh=None) -> rl.Critic:
    """A value model whose trunk starts from ``params``' (a fresh scalar head), with its
    own optimizer at ``exp.critic_lr`` (state in its shards with a ``mesh``)."""
    exp = settled(exp)
    value_graphdef, value_params = api.init(cfg, kind="value", seed=exp.seed)
    value_params["trunk"] = jax.tree.map(jnp.copy, params["trunk"])
    if mesh is not None:
        value_params = sh.place(value_params, sh.param_shardings(value_params, mesh))
    tx = optim.constant(exp.critic_lr)
    return rl.Critic(graphdef=value_graphdef, tx=tx,
                     state=make_state(value_params, tx, mesh, seed=exp.seed))


def rl_identity(exp, p: "Prepared", reward_pool=None) -> dict:
    """What the RL checkpoints of ``exp`` are checkpoints of (``RLTrainer(identity=)``):
    objective, critic, model, task or data, tokenizer, chat template and rewards."""
    exp = settled(exp)
    # the verifier's components, or the kind of reward (a learned reward model)
    rewards = (list(reward_pool.spec.names) if isinstance(reward_pool, RewardPool)
               else type(reward_pool).__name__)
    return {"objective": p.objective.label, "critic": p.objective.separate_critic,
            **model_identity(exp), **data_identity(exp),
            "tokenizer_source": exp.tokenizer or exp.hf_checkpoint or "trained",
            "chat_template": chat_template_on(exp, p.tok),
            "rewards": rewards,
            "sft_steps": exp.sft_steps}


def train_rl(exp, p: Prepared, reward_pool) -> tuple[Any, list[dict], dict]:
    """RL from the SFT policy with ``exp.objective`` against ``reward_pool`` (the
    verifier, or a learned reward); (final params, history rows, held-out evaluation).
    Resumes from ``<run_dir>/checkpoints`` when a run was interrupted (the checkpoints
    carry ``rl_identity``: another objective, model, task, ... is refused as
    ``RLConfig.on_mismatch`` says). The state, its optimizer moments and the
    reference are created in their shards and handed to the trainer: ``p.params`` is
    None afterwards (the trained parameters are returned)."""
    exp = settled(exp)
    resolved = p.objective
    critic = (make_critic(exp, p.cfg, p.params, p.mesh) if resolved.separate_critic
              else None)
    tx = rl_optimizer(exp)
    ref = reference_params(resolved.objective, p.params, p.mesh)
    state = make_state(p.params, tx, p.mesh, seed=exp.seed,
                       objective_state=resolved.objective.init())
    if critic is not None:
        sh.hand_over(critic.state)
    # The prepared params, their moments and the reference are handed to the trainer,
    # which places them without a second copy (and donates the state to its steps).
    # Asynchronous rollouts when rlx.train.AsyncConfig is bound away from its defaults
    # (max_staleness = 0 is the synchronous loop, bitwise).
    async_cfg = async_rl.AsyncConfig()
    bound = [f.name for f in dataclasses.fields(async_cfg)
             if f.default is not dataclasses.MISSING and getattr(async_cfg, f.name) != f.default]
    trainer_cls, extra = rl.RLTrainer, {}
    if bound:
        trainer_cls, extra = async_rl.AsyncRLTrainer, {"async_config": async_cfg}
    trainer = trainer_cls(
        **extra,
        graphdef=p.graphdef, tx=tx, objective=resolved.objective, state=sh.hand_over(state),
        tokenizer=p.tok, stream=ProblemStream(p.train, seed=exp.seed),
        reward_pool=reward_pool, sampler=p.sampler, config=exp.rl, run_dir=exp.run_dir,
        mesh=p.mesh, ref_params=sh.hand_over(ref), evaluator=p.evaluate, logger=p.logger,
        critic=critic, identity=rl_identity(exp, p, reward_pool))
    del state, ref
    p.params = None            # now the trainer's (its first update donates them)
    try:
        history = trainer.run()
        params = trainer.state.params
        after = p.evaluate(params)
    finally:
        trainer.checkpointer.close()
    return params, history, after


# -------------------------------------------------------------------------- outputs
def export_dtype(exp) -> str:
    """The export's tensor dtype: the checkpoint's (``torch_dtype`` / ``dtype`` in its
    config.json) when it is one save_hf writes, else float32."""
    exp = settled(exp)
    if exp.hf_checkpoint:
        try:
            with open(os.path.join(exp.hf_checkpoint, "config.json")) as f:
                hf = json.load(f)
        except (OSError, ValueError):
            hf = {}
        dtype = hf.get("torch_dtype") or hf.get("dtype")
        if dtype in ("float32", "bfloat16", "float16"):
            return dtype
    return "float32"


def finish(exp, p: Prepared, params, summary: dict, t_start: float) -> dict:
    """Curves, the Hugging Face export (``exp.export_hf``: weights, the tokenizer's
    files, bos/eos/pad ids and generation_config.json) and ``summary.json``; returns
    the summary with wall time, run directory, plot and export paths and the seed.
    Several processes: every process takes part in gathering the parameters, process 0
    writes."""
    exp = settled(exp)
    plot = p.logger.plot()
    export = None
    if exp.export_hf:
        from rlx.models.convert import save_hf
        export = os.path.join(exp.run_dir, "hf_export")
        host = sh.host_value(params)        # a collective when params span processes
        if jax.process_index() == 0:
            save_hf(export, p.cfg, host, dtype=export_dtype(exp), overwrite=True,
                    tokenizer=p.tok)
        del host
    summary = {**summary, "wall_seconds": time.time() - t_start, "run_dir": exp.run_dir,
               "plot": plot, "hf_export": export, "seed": exp.seed}
    if jax.process_index() == 0:
        with open(os.path.join(exp.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
