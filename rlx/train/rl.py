"""The RL loop: prompts → group rollouts → rewards → one compiled update.

``RLTrainer.iteration`` is the whole algorithm and reads top to bottom: sample G
completions for P prompts (with DAPO dynamic sampling when asked), decode and score
them on the host, then hand everything any objective may read (``update.IterationBatch``)
to one jitted program that runs the log-prob forwards, the advantage estimator and
every epoch × minibatch × microbatch optimizer step (``rlx.train.update``).

Data: problems come from a grain pipeline (``rlx.train.data``) whose iterator state
is checkpointed with the training state, so a killed run restarted with the same
command resumes bitwise-identically (CPU). All processes of a multi-host run iterate
the same global batch (the sampler and the step shard rows over the mesh); rewards
are scored once, on process 0, and broadcast, so every host trains on identical
values.

One seed: the sampling key of iteration i is ``fold_in(TrainState.key, i)``; the
state's key comes from the run seed (``state.create(seed=...)``) and is checkpointed.

Forced completion prefixes (POPE / PrefixRL-style guidance): a problem whose
``meta["completion_prefix"]`` is a non-empty string has it tokenized and fed as the
first completion tokens of each of its G rows (``Rollout.forced``); those tokens are
masked out of the loss.
"""

from __future__ import annotations

import contextlib
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
from rlx.objectives.types import Objective
from rlx.rewards.pool import RewardPool
from rlx.sampling.config import SamplerConfig
from rlx.sampling.generate import generate
from rlx.train import checkpoint as ckpt_lib
from rlx.train import flops as flops_lib
from rlx.train import state as state_lib
from rlx.train import packing
from rlx.train import signals
from rlx.train import update as update_lib
from rlx.train.batches import Sequences
from rlx.train.data import ProblemStream
from rlx.train.logger import RunLogger

log = logging.getLogger("rlx.rl")

PREFIX_FIELD = "completion_prefix"


def _check_int(name, value, minimum, *, none_ok=False):
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"RLConfig.{name}={value!r}: must be an integer >= {minimum}")


@gin.configurable(module="rlx.train")
@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Sizes of one RL run.

    Attributes:
      steps: RL iterations (rollout batch + updates).
      prompts_per_step: P prompts per iteration (× G rollouts from SamplerConfig).
      epochs: passes over each rollout batch (PPO epochs; 1 = on-policy).
      minibatches: optimizer steps per epoch (minibatch m holds prompts m, m+M, …).
      microbatches: gradient-accumulation chunks per optimizer step.
      dynamic_sampling: drop groups whose rewards have zero variance (DAPO) and draw
        more prompts until P groups are kept, at most ``max_sampling_rounds`` rounds
        (then the batch is filled with the best available groups, zero-variance ones
        included, so the shape stays static). Rounds may fall in different prompt
        buckets; kept groups are left-padded to the longest.
      eval_every: evaluate held-out accuracy every N iterations (0 = only at the ends).
      log_samples_every: print a sample table every N iterations (0 = never).
      shared_prefix_update: run the log-prob passes and updates in the Prefix Grouper
        layout (one packed row per prompt; ``rlx.train.packing``) instead of G rows.
      logprob_temperature: temperature of the trainer's log-probs; None = the sampling
        temperature (so the trainer scores the distribution the sampler drew from; τ = 0
        greedy sampling is scored at 1).
      recompute_old_logp: run the separate old-policy forward even when the iteration
        makes one optimizer step on its own samples (it is skipped by default then,
        ``rlx.train.update``).
      shard_map_update: compute the gradients under ``shard_map`` over the batch axes
        with explicit cross-device sums (default); False = plain ``jit`` partitioning.
      checkpoint_every / checkpoint_minutes / keep_checkpoints: see ``Checkpointer``.
      on_mismatch: what a rerun does when the run directory holds checkpoints of a
        different state or configuration: "error" (stop before any work, naming the
        differences; nothing is touched), "fresh" (start or resume a sibling directory
        ``checkpoints.fresh-<n>``), "partial" (warm start: restore the matching leaves).
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
    logprob_temperature: float | None = None
    recompute_old_logp: bool = False
    shard_map_update: bool = True
    checkpoint_every: int | None = 10
    checkpoint_minutes: float | None = None
    keep_checkpoints: int = 3
    on_mismatch: str = "error"

    def __post_init__(self):
        _check_int("steps", self.steps, 0)
        for name in ("prompts_per_step", "epochs", "minibatches", "microbatches",
                     "max_sampling_rounds", "keep_checkpoints"):
            _check_int(name, getattr(self, name), 1)
        for name in ("eval_every", "log_samples_every"):
            _check_int(name, getattr(self, name), 0)
        _check_int("checkpoint_every", self.checkpoint_every, 1, none_ok=True)
        if self.prompts_per_step % self.minibatches:
            raise ValueError(f"RLConfig.prompts_per_step={self.prompts_per_step} is not "
                             f"divisible by minibatches={self.minibatches}")
        if self.logprob_temperature is not None and not self.logprob_temperature > 0:
            raise ValueError(f"RLConfig.logprob_temperature={self.logprob_temperature!r}: "
                             "must be > 0 (or None for the sampling temperature)")
        if self.on_mismatch not in ("error", "fresh", "partial"):
            raise ValueError(f"RLConfig.on_mismatch={self.on_mismatch!r}: expected 'error', "
                             "'fresh' or 'partial'")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ValueError(f"RLConfig.checkpoint_minutes={self.checkpoint_minutes!r}: "
                             "must be > 0 or None")


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
    """One iteration's kept groups: the rollout (device arrays, or host arrays when
    groups were gathered from several sampling rounds) and host-side scores."""

    rollout: Any
    rewards: np.ndarray            # [P, G] weighted totals
    components: np.ndarray         # [P, G, K]
    texts: list[str]
    problems: list[Any]
    reward_metrics: dict


class RLTrainer:
    """Owns the jitted functions and the loop state of one RL run.

    ``ref_params``: the frozen reference policy for KL terms; when the objective needs
    one (``"ref_logp" in objective.needs``) and none is given, a copy of the starting
    parameters is taken. An objective that needs critic values needs ``critic``.
    ``identity``: plain data describing what the checkpoints are checkpoints of
    (objective, model, task, tokenizer, ...); a rerun whose identity or state structure
    differs is refused (``RLConfig.on_mismatch``) instead of silently restarting.
    """

    def __init__(self, *, graphdef, state: state_lib.TrainState, tx, objective: Objective,
                 tokenizer, stream: ProblemStream, reward_pool: RewardPool,
                 sampler: SamplerConfig, config: RLConfig, run_dir: str, mesh=None,
                 ref_params=None, evaluator: Callable | None = None,
                 logger: RunLogger | None = None, critic: "Critic | None" = None,
                 identity: dict | None = None):
        needs = getattr(objective, "needs", frozenset())
        if "values" in needs and critic is None:
            raise ValueError("the objective reads critic values (GAE) but RLTrainer got no "
                             "critic; pass critic=rl.Critic(...) (objective 'ppo' in "
                             "rlx train builds one)")
        self.graphdef, self.tx, self.objective = graphdef, tx, objective
        self.model_config = api.merge(graphdef, state.params).cfg   # static shape facts
        self.tokenizer, self.stream, self.pool = tokenizer, stream, reward_pool
        self.sampler, self.config, self.run_dir = sampler, config, run_dir
        self.mesh = mesh or sh.make_mesh()
        self.state_shardings = sh.state_shardings(state, self.mesh)
        if ref_params is None and "ref_logp" in needs:
            ref_params = jax.tree.map(jnp.copy, state.params)
        self.ref_shardings = (sh.param_shardings(ref_params, self.mesh)
                              if ref_params is not None else None)
        self.ref_params = (sh.place(ref_params, self.ref_shardings)
                           if ref_params is not None else None)
        self.state = sh.place(state, self.state_shardings)
        self.critic = critic
        self.critic_shardings = None
        if critic is not None:
            self.critic_shardings = sh.state_shardings(critic.state, self.mesh)
            critic.state = sh.place(critic.state, self.critic_shardings)
        self.evaluator = evaluator
        self.logger = logger or RunLogger(run_dir, total_steps=config.steps)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(run_dir, "checkpoints"), every_steps=config.checkpoint_every,
            every_minutes=config.checkpoint_minutes, keep=config.keep_checkpoints,
            identity=identity, on_mismatch=config.on_mismatch)
        self.iteration_index = 0
        tau = config.logprob_temperature
        if tau is None:
            tau = sampler.temperature if sampler.temperature > 0 else 1.0
        self.logprob_temperature = float(tau)
        self._update_fn = update_lib.make_update(
            graphdef, tx, objective, num_generations=sampler.num_generations,
            epochs=config.epochs, minibatches=config.minibatches,
            microbatches=config.microbatches, temperature=self.logprob_temperature,
            reuse_logp=False if config.recompute_old_logp else None,
            critic=(update_lib.CriticSpec(critic.graphdef, critic.tx, critic.clip_eps)
                    if critic is not None else None),
            mesh=self.mesh, shard_map=config.shard_map_update)
        self._compiled: dict = {}        # one compiled update per batch shape
        self._packed_checked: set = set()  # shapes _check_packed_cost has looked at
        self.compilations = 0

    # ------------------------------------------------------------------ pieces
    def sampling_key(self) -> jax.Array:
        """The key of this iteration's rollouts: fold_in(TrainState.key, iteration)."""
        base = jax.random.wrap_key_data(jnp.asarray(sh.host_value(self.state.key)))
        return jax.random.fold_in(base, self.iteration_index)

    def _forced_prefixes(self, problems):
        """[P·G, F] forced ids and [P·G] counts from ``meta["completion_prefix"]``."""
        texts = [(q.meta or {}).get(PREFIX_FIELD) or "" for q in problems]
        if not any(texts):
            return None, None
        for q, text in zip(problems, texts):
            if not isinstance(text, str):
                raise ValueError(f"problem {q.prompt[:40]!r}: meta[{PREFIX_FIELD!r}] must be "
                                 f"a string, got {type(text).__name__}")
        ids = [self.tokenizer.encode(t) if t else [] for t in texts]
        width = max(1, max(len(i) for i in ids))
        if width > self.sampler.max_new_tokens:
            raise ValueError(f"a {PREFIX_FIELD} has {width} tokens, more than "
                             f"max_new_tokens={self.sampler.max_new_tokens}")
        g = self.sampler.num_generations
        forced = np.full((len(ids) * g, width), self.sampler.pad_id, np.int32)
        lengths = np.zeros((len(ids) * g,), np.int32)
        for p, row in enumerate(ids):
            forced[p * g:(p + 1) * g, :len(row)] = row
            lengths[p * g:(p + 1) * g] = len(row)
        return forced, lengths

    def collect(self, key) -> Collected:
        """Samples G completions for P prompts and scores them (with dynamic sampling)."""
        p, g = self.config.prompts_per_step, self.sampler.num_generations
        kept: list[tuple] = []
        spare: list[tuple] = []
        metrics: dict = {}
        for round_ in range(self.config.max_sampling_rounds if self.config.dynamic_sampling else 1):
            problems = self.stream.next_batch(p)
            ids, mask = self.tokenizer.batch_encode([q.prompt for q in problems],
                                                    padding_side="left", add_bos=None)
            forced, forced_lengths = self._forced_prefixes(problems)
            t0 = time.perf_counter()
            rollout = generate(self.graphdef, self.state.params, ids, mask,
                               key=jax.random.fold_in(key, round_), config=self.sampler,
                               forced_prefix=forced, forced_lengths=forced_lengths,
                               mesh=self.mesh, data_axis=sh.BATCH_AXES)
            jax.block_until_ready(rollout)
            t1 = time.perf_counter()
            texts = self._decode(rollout)
            t2 = time.perf_counter()
            scored = self._score(texts, [q for q in problems for _ in range(g)])
            if self.iteration_index == 0 and scored["all_failed"]:
                # a reward broken on every call: stop with its error (one CLI line)
                raise ValueError(f"stopping before the first update: {scored['all_failed']}")
            bad = {k: scored["counts"].get(k, 0) for k in ("failures", "timeouts", "crashes")}
            if any(bad.values()):
                log.warning("iteration %d: reward calls failed %s; e.g. %s",
                            self.iteration_index, bad, "; ".join(scored["errors"][:2]))
            for name, dt in (("generate", t1 - t0), ("decode", t2 - t1),
                             ("reward", time.perf_counter() - t2)):
                metrics[f"time/{name}"] = metrics.get(f"time/{name}", 0.0) + dt
            rewards = np.asarray(scored["scores"], np.float32).reshape(p, g)
            components = np.asarray(scored["components"], np.float32).reshape(p, g, -1)
            for k, v in scored["metrics"].items():
                if k.endswith(("failures", "timeouts", "crashes", "seconds")):
                    metrics[k] = metrics.get(k, 0.0) + v      # counts add up over rounds
                else:
                    metrics[k] = v                            # means: the last round's
            metrics["dynamic_sampling/rounds"] = float(round_ + 1)
            for i in range(p):
                group = (rollout, i, rewards[i], components[i], texts[i * g:(i + 1) * g],
                         problems[i])
                (kept if not self.config.dynamic_sampling or np.ptp(rewards[i]) > 0
                 else spare).append(group)
            if len(kept) >= p:
                break
        groups = (kept + spare)[:p]
        metrics["dynamic_sampling/kept_groups"] = float(min(len(kept), p))
        return self._stack(groups, metrics)

    def _score(self, texts, problems) -> dict:
        """Scores the completions once and returns plain host values.

        Multi-host: process 0 scores and broadcasts the result (scores, components,
        metrics, failure report), so every host trains on identical values even when a
        reward times out on one host only. A reward that failed on every sample is
        reported in ``all_failed`` (its error message), for every host alike.
        """
        import json

        def local():
            got = self.pool.score(texts, problems)
            all_failed = ""
            if hasattr(got, "raise_if_all_failed"):
                try:
                    got.raise_if_all_failed()
                except Exception as err:     # noqa: BLE001 - reported, raised by the caller
                    all_failed = str(err)
            return {"scores": np.asarray(got.scores, np.float64).tolist(),
                    "components": np.asarray(got.components, np.float64).tolist(),
                    "metrics": {k: float(v) for k, v in got.metrics().items()},
                    "counts": {k: int(getattr(got, k, 0) or 0)
                               for k in ("failures", "timeouts", "crashes")},
                    "errors": [str(e) for e in got.errors], "all_failed": all_failed}

        if jax.process_count() == 1:
            return local()
        from jax.experimental import multihost_utils as mh

        blob = (json.dumps(local()).encode() if jax.process_index() == 0 else b"")
        n = int(mh.broadcast_one_to_all(np.asarray(len(blob), np.int64)))
        buf = np.frombuffer(blob, np.uint8) if blob else np.zeros((n,), np.uint8)
        buf = np.asarray(mh.broadcast_one_to_all(buf), np.uint8)
        return json.loads(buf.tobytes().decode())

    def _decode(self, rollout) -> list[str]:
        ids, mask = sh.host_value((rollout.completion_ids, rollout.completion_mask))
        return [self.tokenizer.decode(row[m].tolist()) for row, m in zip(ids, mask)]

    def _stack(self, groups, metrics) -> Collected:
        g = self.sampler.num_generations
        if all(grp[0] is groups[0][0] for grp in groups) and \
                [grp[1] for grp in groups] == list(range(len(groups))):
            rollout = groups[0][0]
        else:   # gather the kept groups' rows from their rounds (host arrays)
            hosted = {}
            for r, *_ in groups:
                if id(r) not in hosted:
                    hosted[id(r)] = sh.host_value(r)
            width = max(hosted[id(r)].prompt_ids.shape[1] for r, *_ in groups)
            parts = []
            for r, i, *_ in groups:
                h = hosted[id(r)]
                rows = np.arange(i * g, (i + 1) * g)
                part = jax.tree.map(lambda x: np.asarray(x)[rows] if np.ndim(x) else x, h)
                pad = width - part.prompt_ids.shape[1]
                if pad:   # rounds in different prompt buckets: left-pad to the longest
                    part = part.replace(
                        prompt_ids=np.pad(part.prompt_ids, ((0, 0), (pad, 0)),
                                          constant_values=self.sampler.pad_id),
                        prompt_mask=np.pad(part.prompt_mask, ((0, 0), (pad, 0))))
                parts.append(part)
            rollout = jax.tree.map(
                lambda *xs: np.concatenate(xs) if np.ndim(xs[0]) else np.max(np.stack(xs)),
                *parts)
            rollout = rollout.replace(group_id=np.repeat(np.arange(len(groups)), g)
                                      .astype(np.int32))
        return Collected(rollout=rollout, rewards=np.stack([grp[2] for grp in groups]),
                         components=np.stack([grp[3] for grp in groups]),
                         texts=[t for grp in groups for t in grp[4]],
                         problems=[grp[5] for grp in groups], reward_metrics=metrics)

    def sequences(self, rollout) -> Sequences:
        tokens, mask, positions = rollout.sequences()
        return Sequences(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                         positions=jnp.asarray(positions))

    def iteration_batch(self, got: Collected) -> update_lib.IterationBatch:
        """Everything any objective may read, sharded over the batch axes."""
        r = got.rollout
        if self.config.shared_prefix_update:        # one packed row per prompt
            seq = packing.pack_rollout(r, self.sampler.num_generations,
                                       pad_id=self.sampler.pad_id)
            self._check_packed_cost(r.prompt_ids.shape[1], r.completion_ids.shape[1],
                                    seq.tokens.shape[1])
        else:
            seq = self.sequences(r)
        b = got.rewards.size
        batch = update_lib.IterationBatch(
            seq=seq, rewards=got.rewards.reshape(b).astype(np.float32),
            components=got.components.reshape(b, -1).astype(np.float32),
            mask=jnp.asarray(r.completion_mask) & ~jnp.asarray(r.forced),
            tokens=r.completion_ids, lengths=r.lengths, finished=r.finished,
            truncated=r.truncated, forced=r.forced, sampler_logp=r.sampling_logprobs,
            group_ids=r.group_id)
        return sh.shard_batch(batch, self.mesh)

    def _check_packed_cost(self, sp: int, t: int, width: int) -> None:
        """Warns once per shape where the Prefix Grouper layout computes more attention
        than G separate rows: with a dense attention backend the packed row of width
        W = Sp + G·T costs W² scores against G·(Sp + T)² for the naive layout, so it
        loses (and needs that much more memory) once G·T is large next to Sp
        (``benchmarks/scaling.py``, BUILD_NOTES "Scaling table")."""
        g, backend = self.sampler.num_generations, self.model_config.attention_backend
        key = (sp, t, width)
        if backend == "block_sparse" or key in self._packed_checked:
            return
        self._packed_checked.add(key)
        packed, naive = width ** 2, g * (sp + t) ** 2
        if packed > naive:
            log.warning("shared_prefix_update=True with attention_backend=%r: the packed row "
                        "(width %d) computes %.1fx the attention scores of %d separate rows "
                        "(prompt %d + completion %d tokens), so it is slower and needs more "
                        "memory than the naive layout here; set "
                        "rlx.train.RLConfig.shared_prefix_update = False or use "
                        "attention_backend='block_sparse'", backend, width, packed / naive, g,
                        sp, t)

    def update_step(self, batch: update_lib.IterationBatch) -> dict:
        """The compiled update of this iteration (one program per batch shape)."""
        shape = (batch.mask.shape, tuple(x.shape for x in jax.tree.leaves(batch.seq)))
        fn = self._compiled.get(shape)
        if fn is None:
            fn = update_lib.jit_update(self._update_fn, self.mesh, self.state_shardings,
                                       self.critic_shardings, self.ref_shardings, batch)
            self._compiled[shape] = fn
            self.compilations += 1
        critic_state = self.critic.state if self.critic is not None else None
        self.state, critic_state, metrics = fn(self.state, critic_state, self.ref_params, batch)
        if self.critic is not None:
            self.critic.state = critic_state
        return metrics

    # -------------------------------------------------------------- iteration
    def iteration(self) -> dict:
        """One RL iteration. Returns its metrics."""
        times = {}
        t0 = time.perf_counter()
        key = self.sampling_key()

        # 1. rollouts and rewards (host-side reward functions, isolated in a pool)
        got = self.collect(key)
        rollout = got.rollout
        times["time/collect"] = time.perf_counter() - t0

        # 2. one compiled program: log-prob passes, advantages, every optimizer step
        t2 = time.perf_counter()
        batch = self.iteration_batch(got)
        step_metrics = jax.device_get(self.update_step(batch))
        times["time/update"] = time.perf_counter() - t2

        self.iteration_index += 1
        lengths = sh.host_value(rollout.lengths)
        total = time.perf_counter() - t0
        # host work: tokenization, text decoding, rewards, batch assembly and transfers
        times["time/host"] = max(total - times["time/update"]
                                 - got.reward_metrics.get("time/generate", 0.0), 0.0)
        peak = flops_lib.peak_flops()
        if peak:   # model FLOPs utilisation of the update phase (accelerators only)
            rows, width = rollout.completion_ids.shape[0], (rollout.prompt_ids.shape[1]
                                                            + rollout.completion_ids.shape[1])
            flops = self.config.epochs * flops_lib.train_flops(self.model_config, rows, width)
            times["perf/update_mfu"] = flops / times["time/update"] / (peak * jax.device_count())
        return {**{k: float(v) for k, v in step_metrics.items()}, **got.reward_metrics, **times,
                "reward_mean": float(got.rewards.mean()),
                "response_length": float(lengths.mean()),
                "tokens_per_s": float(lengths.sum() / max(total, 1e-9)),
                "time/iteration": total,
                "_texts": got.texts, "_problems": got.problems, "_rewards": got.rewards}

    # -------------------------------------------------------------------- run
    def resume(self) -> bool:
        """Restores the newest good checkpoint (state + data iterator). True if found.

        Announced on the console (which step, which directory); a checkpoint of a
        different state or configuration raises ``CheckpointMismatch`` before any work
        (``RLConfig.on_mismatch``)."""
        current = {"policy": self.state}
        abstract = {"policy": ckpt_lib.abstract_like(self.state, self.state_shardings)}
        if self.critic is not None:
            abstract["critic"] = ckpt_lib.abstract_like(self.critic.state, self.critic_shardings)
            current["critic"] = self.critic.state
        found = self.checkpointer.restore_latest(
            abstract, init_state=current if self.config.on_mismatch == "partial" else None)
        if found is None:
            return False
        step, states, data_state, extra = found
        self.state = states["policy"]        # restored straight into its shardings
        if self.critic is not None:
            self.critic.state = states["critic"]
        if data_state is not None:
            self.stream.set_state(data_state)
        self.iteration_index = int(extra.get("iteration", step))
        report = getattr(self.checkpointer, "last_restore", None)
        how = f" ({report.mode})" if report is not None and report.mode != "exact" else ""
        msg = (f"resumed from checkpoint step {step}{how} in {self.checkpointer.directory}: "
               f"continuing at iteration {self.iteration_index} of {self.config.steps}")
        log.info(msg)
        if jax.process_index() == 0:
            print(msg, flush=True)
        return True

    def save(self, force: bool = False) -> None:
        """Checkpoints the policy (and critic) state, the data-iterator position and the
        iteration counter when due (always with ``force``). A SIGINT / SIGTERM arriving
        while the save is being started waits until it is (``rlx.train.signals``)."""
        states = {"policy": self.state}
        if self.critic is not None:
            states["critic"] = self.critic.state
        args = (self.iteration_index, states, self.stream.get_state(),
                {"iteration": self.iteration_index})
        guard = getattr(self, "_signals", None)
        with guard.deferred() if guard is not None else contextlib.nullcontext():
            if force:
                self.checkpointer.save(*args)
            else:
                self.checkpointer.maybe_save(*args)

    def run(self) -> list[dict]:
        """Resumes, runs the remaining iterations (checkpointing as configured) and
        makes a final save. SIGINT / SIGTERM stop the loop at once: the unfinished
        iteration is dropped, the save in flight is finished, one line says where a
        rerun resumes, and ``signals.Interrupted`` (a ``SystemExit``, code 128 + signal)
        is raised."""
        history = []
        with signals.guard("the RL phase") as guard:
            self._signals = guard
            try:
                self.resume()
                while self.iteration_index < self.config.steps:
                    guard.check()
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
                    guard.check()
                    self.save()
                self.save(force=True)
                self.checkpointer.wait()
            except signals.Interrupted as err:
                def newest() -> str:
                    steps = self.checkpointer.steps()
                    return (f"checkpoint step {steps[-1]} in {self.checkpointer.directory}"
                            if steps else "the start of the RL phase (no checkpoint yet)")
                signals.stop(err, phase="the RL phase", step=self.iteration_index,
                             total=self.config.steps, wait=self.checkpointer.wait,
                             resume_from=newest)
                raise
            finally:
                self._signals = None
        return history

    def close(self) -> None:
        """Finishes any save in flight and closes the checkpointer and the logger. A
        first SIGINT / SIGTERM meanwhile waits for the save to complete (then stops
        the process with one line); a second one exits at once, leaving only orbax's
        temporary directory, which the next run removes."""
        try:
            with signals.guard("closing the RL phase") as guard:
                try:
                    with guard.deferred():
                        self.checkpointer.close()
                except signals.Interrupted as err:
                    signals.stop(err, phase="closing the RL phase",
                                 step=self.iteration_index, total=self.config.steps,
                                 resume_from=lambda: "its newest checkpoint (complete)")
                    raise
        finally:
            self.logger.close()
