"""The RL loop: prompts → group rollouts → rewards → advantages → minibatch updates.

``RLTrainer.iteration`` is the whole algorithm and reads top to bottom; the heavy
parts (sampling, log-prob passes, the update step) are jit-compiled pure functions.

Data: problems come from a grain pipeline (``rlx.train.data``) whose iterator state
is checkpointed with the training state, so a killed run restarted with the same
command resumes bitwise-identically (CPU). All processes of a multi-host run iterate
the same global batch (the sampler and the step shard rows over the mesh); rewards
are scored on every host from identical inputs, so every host holds identical
host-side values.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from rlx import sharding as sh
from rlx.models import api
from rlx.objectives.types import Objective, PolicyBatch, RewardBatch
from rlx.rewards.pool import RewardPool
from rlx.sampling.config import SamplerConfig
from rlx.sampling.generate import generate
from rlx.train import checkpoint as ckpt_lib
from rlx.train import flops as flops_lib
from rlx.train import state as state_lib
from rlx.train import packing
from rlx.train import steps as steps_lib
from rlx.train.batches import PackedRolloutBatch, RolloutBatch, Sequences
from rlx.train.data import ProblemStream
from rlx.train.logger import RunLogger

log = logging.getLogger("rlx.rl")


@gin.configurable(module="rlx.train")
@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Sizes of one RL run.

    Attributes:
      steps: RL iterations (rollout batch + updates).
      prompts_per_step: P prompts per iteration (× G rollouts from SamplerConfig).
      epochs: passes over each rollout batch (PPO epochs; 1 = on-policy).
      minibatches: optimizer steps per epoch (the rollout batch is split in order).
      microbatches: gradient-accumulation chunks per optimizer step.
      dynamic_sampling: drop groups whose rewards have zero variance (DAPO) and draw
        more prompts until P groups are kept, at most ``max_sampling_rounds`` rounds
        (then the batch is filled with the best available groups, zero-variance ones
        included, so the shape stays static).
      eval_every: evaluate held-out accuracy every N iterations (0 = only at the ends).
      log_samples_every: print a sample table every N iterations (0 = never).
      shared_prefix_update: run the log-prob passes and updates in the Prefix Grouper
        layout (one packed row per prompt; ``rlx.train.packing``) instead of G rows.
      checkpoint_every / checkpoint_minutes / keep_checkpoints: see ``Checkpointer``.
      seed: run seed (data order, sampling keys, init).
    """

    steps: int = 40
    prompts_per_step: int = 16
    epochs: int = 1
    minibatches: int = 1
    microbatches: int = 1
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    eval_every: int = 10
    log_samples_every: int = 10
    shared_prefix_update: bool = False
    checkpoint_every: int | None = 10
    checkpoint_minutes: float | None = None
    keep_checkpoints: int = 3
    seed: int = 0


@dataclasses.dataclass
class Critic:
    """A separately trained value model (PPO): its static definition, its own
    TrainState and optimizer, and the value-clipping ε of its clipped value loss."""

    graphdef: Any
    state: state_lib.TrainState
    tx: Any
    clip_eps: float | None = 0.2


@dataclasses.dataclass
class Collected:
    """One iteration's kept groups (host numpy + device rollout arrays)."""

    rollout: Any
    rewards: np.ndarray            # [P, G]
    texts: list[str]
    problems: list[Any]
    reward_metrics: dict


class RLTrainer:
    """Owns the jitted functions and the loop state of one RL run."""

    def __init__(self, *, graphdef, state: state_lib.TrainState, tx, objective: Objective,
                 tokenizer, stream: ProblemStream, reward_pool: RewardPool,
                 sampler: SamplerConfig, config: RLConfig, run_dir: str, mesh=None,
                 ref_params=None, evaluator: Callable | None = None,
                 logger: RunLogger | None = None, critic: "Critic | None" = None):
        self.graphdef, self.tx, self.objective = graphdef, tx, objective
        self.model_config = api.merge(graphdef, state.params).cfg   # static shape facts
        self.tokenizer, self.stream, self.pool = tokenizer, stream, reward_pool
        self.sampler, self.config, self.run_dir = sampler, config, run_dir
        self.mesh = mesh or sh.make_mesh()
        self.state_shardings = sh.state_shardings(state, self.mesh)
        self.state = sh.place(state, self.state_shardings)
        self.ref_params = ref_params
        self.critic = critic
        if critic is not None:
            self.critic_shardings = sh.state_shardings(critic.state, self.mesh)
            critic.state = sh.place(critic.state, self.critic_shardings)
            self._values = jax.jit(
                lambda params, seq, t: steps_lib.completion_values(critic.graphdef, params, seq, t),
                static_argnums=(2,))
            self._packed_values = jax.jit(
                lambda params, packed: packing.packed_completion_values(critic.graphdef, params,
                                                                        packed))
            self._value_step = None
        self.evaluator = evaluator
        self.logger = logger or RunLogger(run_dir, total_steps=config.steps)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(run_dir, "checkpoints"), every_steps=config.checkpoint_every,
            every_minutes=config.checkpoint_minutes, keep=config.keep_checkpoints)
        self.iteration_index = 0
        self._policy_step = None
        self._logprobs = jax.jit(self._completion_logprobs, static_argnums=(2,))
        self._packed_logprobs = jax.jit(
            lambda params, packed: packing.packed_completion_outputs(graphdef, params, packed).logp)

    # ------------------------------------------------------------------ pieces
    def _completion_logprobs(self, params, seq: Sequences, t: int):
        return steps_lib.completion_outputs(self.graphdef, params, seq, t).logp

    def collect(self, key) -> Collected:
        """Samples G completions for P prompts and scores them (with dynamic sampling)."""
        p, g = self.config.prompts_per_step, self.sampler.num_generations
        kept: list[tuple] = []
        spare: list[tuple] = []
        metrics: dict = {}
        for round_ in range(self.config.max_sampling_rounds if self.config.dynamic_sampling else 1):
            problems = self.stream.next_batch(p)
            ids, mask = self.tokenizer.batch_encode([q.prompt for q in problems],
                                                    padding_side="left", add_bos=True)
            t0 = time.perf_counter()
            rollout = generate(self.graphdef, self.state.params, ids, mask,
                               key=jax.random.fold_in(key, round_), config=self.sampler,
                               mesh=self.mesh, data_axis=sh.BATCH_AXES)
            texts = self._decode(rollout)
            t1 = time.perf_counter()
            scored = self.pool.score(texts, [q for q in problems for _ in range(g)])
            metrics["time/generate"] = metrics.get("time/generate", 0.0) + t1 - t0
            metrics["time/reward"] = metrics.get("time/reward", 0.0) + time.perf_counter() - t1
            rewards = scored.scores.reshape(p, g)
            for k, v in scored.metrics().items():
                if k.endswith(("failures", "timeouts", "seconds")):
                    metrics[k] = metrics.get(k, 0.0) + v      # counts add up over rounds
                else:
                    metrics[k] = v                            # means: the last round's
            metrics["dynamic_sampling/rounds"] = float(round_ + 1)
            for i in range(p):
                group = (rollout, i, rewards[i], texts[i * g:(i + 1) * g], problems[i])
                (kept if not self.config.dynamic_sampling or np.ptp(rewards[i]) > 0
                 else spare).append(group)
            if len(kept) >= p:
                break
        groups = (kept + spare)[:p]
        metrics["dynamic_sampling/kept_groups"] = float(min(len(kept), p))
        return self._stack(groups, metrics)

    def _decode(self, rollout) -> list[str]:
        ids, mask = sh.host_value((rollout.completion_ids, rollout.completion_mask))
        return [self.tokenizer.decode(row[m].tolist()) for row, m in zip(ids, mask)]

    def _stack(self, groups, metrics) -> Collected:
        g = self.sampler.num_generations
        if all(grp[0] is groups[0][0] for grp in groups) and \
                [grp[1] for grp in groups] == list(range(len(groups))):
            rollout = groups[0][0]
        else:   # gather the kept groups' rows (rollouts of one run share bucket shapes)
            parts = []
            hosted = {}
            for r, i, *_ in groups:
                if id(r) not in hosted:
                    hosted[id(r)] = sh.host_value(r)
                r = hosted[id(r)]
                rows = np.arange(i * g, (i + 1) * g)
                parts.append(jax.tree.map(lambda x: np.asarray(x)[rows] if np.ndim(x) else x, r))
            rollout = jax.tree.map(lambda *xs: np.concatenate(xs) if np.ndim(xs[0]) else xs[0],
                                   *parts)
        return Collected(rollout=rollout, rewards=np.stack([grp[2] for grp in groups]),
                         texts=[t for grp in groups for t in grp[3]],
                         problems=[grp[4] for grp in groups], reward_metrics=metrics)

    def sequences(self, rollout) -> Sequences:
        tokens, mask, positions = rollout.sequences()
        return Sequences(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                         positions=jnp.asarray(positions))

    def policy_step(self, batch: RolloutBatch):
        if self._policy_step is None:
            fn = steps_lib.make_policy_step(self.graphdef, self.tx, self.objective,
                                            num_microbatches=self.config.microbatches)
            self._policy_step = steps_lib.jit_step(fn, self.mesh, self.state_shardings, batch)
        self.state, metrics = self._policy_step(self.state, batch)
        return metrics

    def value_step(self, batch: RolloutBatch):
        c = self.critic
        if self._value_step is None:
            fn = steps_lib.make_value_step(c.graphdef, c.tx, clip_eps=c.clip_eps,
                                           num_microbatches=self.config.microbatches)
            self._value_step = steps_lib.jit_step(fn, self.mesh, self.critic_shardings, batch)
        c.state, metrics = self._value_step(c.state, batch)
        return metrics

    def minibatches(self, seq, pb: PolicyBatch):
        """Splits the batch into ``minibatches`` contiguous chunks of whole groups."""
        n = self.config.minibatches
        full = (PackedRolloutBatch.create(seq, pb) if isinstance(seq, packing.PackedSequences)
                else RolloutBatch(seq=seq, policy=pb))
        leading = jax.tree.leaves(full)[0].shape[0]     # rows, or prompts when packed
        if leading % n:
            raise ValueError(f"rollout batch of {leading} not divisible by minibatches={n}")
        size = leading // n
        for i in range(n):
            take = lambda x: x[i * size:(i + 1) * size] if np.ndim(x) else x  # noqa: E731
            yield sh.shard_batch(jax.tree.map(take, full), self.mesh)

    # -------------------------------------------------------------- iteration
    def iteration(self) -> dict:
        """One RL iteration. Returns its metrics."""
        times = {}
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(self.config.seed), self.iteration_index)

        # 1. rollouts and rewards (host-side reward functions, isolated in a pool)
        got = self.collect(key)
        rollout, t = got.rollout, got.rollout.completion_ids.shape[1]
        seq = self.sequences(rollout)
        times["time/collect"] = time.perf_counter() - t0

        # 2. log-probs of the behaviour (old) and reference policies
        t1 = time.perf_counter()
        mask = jnp.asarray(rollout.loss_mask, jnp.float32)
        if self.config.shared_prefix_update:        # one packed row per prompt
            seq = packing.pack_rollout(rollout, self.sampler.num_generations,
                                       pad_id=self.sampler.pad_id)
            logp_fn, value_fn = self._packed_logprobs, getattr(self, "_packed_values", None)
        else:
            logp_fn = lambda params, s: self._logprobs(params, s, t)  # noqa: E731
            value_fn = (lambda params, s: self._values(params, s, t)) if self.critic else None  # noqa: E731
        old_logp = logp_fn(self.state.params, seq)
        ref_logp = logp_fn(self.ref_params, seq) if self.ref_params is not None else None
        values = value_fn(self.critic.state.params, seq) if self.critic else None
        jax.block_until_ready(old_logp)
        times["time/logprobs"] = time.perf_counter() - t1

        # 3. advantages from rewards [P, G]
        adv = self.objective.advantages(RewardBatch(
            rewards=jnp.asarray(got.rewards, jnp.float32), mask=mask,
            lengths=jnp.asarray(rollout.lengths), values=values))
        pb = PolicyBatch(mask=adv.mask, old_logp=old_logp, advantages=adv.advantages,
                         ref_logp=ref_logp, group_ids=jnp.asarray(rollout.group_id),
                         old_values=values, returns=adv.returns)

        # 4. several epochs of minibatch updates
        t2 = time.perf_counter()
        for _ in range(self.config.epochs):
            for batch in self.minibatches(seq, pb):
                step_metrics = self.policy_step(batch)
                if self.critic is not None:
                    step_metrics = {**step_metrics, **self.value_step(batch)}
        step_metrics = jax.device_get(step_metrics)
        times["time/update"] = time.perf_counter() - t2

        self.iteration_index += 1
        lengths = sh.host_value(rollout.lengths)
        total = time.perf_counter() - t0
        peak = flops_lib.peak_flops()
        if peak:   # model FLOPs utilisation of the update phase (accelerators only)
            rows, width = rollout.completion_ids.shape[0], rollout.prompt_ids.shape[1] + t
            flops = self.config.epochs * flops_lib.train_flops(self.model_config, rows, width)
            times["perf/update_mfu"] = flops / times["time/update"] / (peak * jax.device_count())
        return {**step_metrics, **got.reward_metrics, **adv.metrics, **times,
                "reward_mean": float(got.rewards.mean()),
                "response_length": float(lengths.mean()),
                "tokens_per_s": float(lengths.sum() / max(total, 1e-9)),
                "time/iteration": total,
                "_texts": got.texts, "_problems": got.problems, "_rewards": got.rewards}

    # -------------------------------------------------------------------- run
    def resume(self) -> bool:
        """Restores the newest good checkpoint (state + data iterator). True if found."""
        abstract = {"policy": ckpt_lib.abstract_like(self.state, self.state_shardings)}
        if self.critic is not None:
            abstract["critic"] = ckpt_lib.abstract_like(self.critic.state, self.critic_shardings)
        found = self.checkpointer.restore_latest(abstract)
        if found is None:
            return False
        step, states, data_state, extra = found
        self.state = states["policy"]
        if self.critic is not None:
            self.critic.state = states["critic"]
        self.stream.set_state(data_state)
        self.iteration_index = int(extra.get("iteration", step))
        log.info("resumed from checkpoint step %d", step)
        return True

    def save(self, force: bool = False) -> None:
        states = {"policy": self.state}
        if self.critic is not None:
            states["critic"] = self.critic.state
        args = (self.iteration_index, states, self.stream.get_state(),
                {"iteration": self.iteration_index})
        if force:
            self.checkpointer.save(*args)
        else:
            self.checkpointer.maybe_save(*args)

    def run(self) -> list[dict]:
        history = []
        self.resume()
        while self.iteration_index < self.config.steps:
            metrics = self.iteration()
            texts, problems, rewards = (metrics.pop("_texts"), metrics.pop("_problems"),
                                        metrics.pop("_rewards"))
            every = self.config.eval_every
            if self.evaluator is not None and every and self.iteration_index % every == 0:
                metrics.update(self.evaluator(self.state.params))
            row = self.logger.log(self.iteration_index, metrics)
            every = self.config.log_samples_every
            if every and self.iteration_index % every == 0:
                g = self.sampler.num_generations
                self.logger.samples(self.iteration_index,
                                    [problems[i // g].prompt for i in range(len(texts))],
                                    texts, rewards.reshape(-1))
            history.append(row)
            self.save()
        self.save(force=True)
        self.checkpointer.wait()
        return history

    def close(self) -> None:
        self.checkpointer.close()
        self.logger.close()
