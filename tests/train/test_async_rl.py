"""Asynchronous RL (rlx.train.async_rl): bounded staleness, versions, partial rollouts,
exact old logits, weight publishing, checkpoints.

The scheduling core (``RolloutPipeline``) is driven by a fake producer with random
speeds; everything else drives the real ``AsyncRLTrainer`` on a tiny model.
"""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlx.models import api, config
from rlx.objectives import presets
from rlx.rewards.pool import RewardResult
from rlx.sampling.config import SamplerConfig
from rlx.tasks import Problem
from rlx.train import optim, state as state_lib
from rlx.train import steps as steps_lib
from rlx.train.async_rl import (AsyncConfig, AsyncRLTrainer, Generation, ProducerError,
                                Published, RolloutPipeline, StalenessError, VersionedRollout,
                                WeightTransferError)
from rlx.train.batches import Sequences
from rlx.train.data import ProblemStream
from rlx.train.rl import RLConfig, RLTrainer

from test_rl_loop import DigitTokenizer

P, G, NEW = 4, 4, 4
SCRIPTS = Path(__file__).parent / "scripts"


# ----------------------------------------------------------------------- config
def test_config_is_gin_configurable_and_validated():
    import gin

    gin.clear_config()
    try:
        gin.parse_config(["rlx.train.AsyncConfig.max_staleness = 2",
                          'rlx.train.AsyncConfig.placement = "split"',
                          "rlx.train.AsyncConfig.partial_rollouts = True",
                          'rlx.train.AsyncConfig.old_logits = "ewma"',
                          "rlx.train.AsyncConfig.ewma_decay = 0.25"])
        cfg = AsyncConfig()
        assert (cfg.max_staleness, cfg.placement, cfg.partial_rollouts) == (2, "split", True)
        assert (cfg.old_logits, cfg.ewma_decay, cfg.proximal_decay) == ("ewma", 0.25, 0.25)
    finally:
        gin.clear_config()
    assert AsyncConfig(max_staleness=3, old_logits="ewma").proximal_decay == 0.75
    for kw, match in [({"max_staleness": -1}, "max_staleness=-1"),
                      ({"max_staleness": True}, "max_staleness=True"),
                      ({"placement": "remote"}, "placement='remote'"),
                      ({"schedule": "eager"}, "schedule='eager'"),
                      ({"old_logits": "proximal"}, "old_logits='proximal'"),
                      ({"old_logits": "ewma", "ewma_decay": 1.0}, "ewma_decay=1.0"),
                      ({"old_logits": "ewma", "ewma_decay": -0.5}, "ewma_decay=-0.5"),
                      ({"old_logits": "ewma", "ewma_decay": True}, "ewma_decay=True"),
                      ({"old_logits": "ewma", "ewma_decay": "0.5"}, "ewma_decay='0.5'"),
                      ({"ewma_decay": 0.5}, "ewma_decay=0.5: is only used with"),
                      ({"chunk_tokens": 0}, "chunk_tokens=0"),
                      ({"discrepancy_band": (2.0, 1.0)}, "discrepancy_band"),
                      ({"publish_timeout_s": 0}, "publish_timeout_s=0")]:
        with pytest.raises(ValueError, match=match):
            AsyncConfig(**kw)


# ------------------------------------------------------------------ the fake producer
class FakeWork:
    """Units that sleep a random time and record the version they ran with; batch j
    stops after ``stops[j]`` units (early finish, as when every row stopped)."""

    def __init__(self, units, seed, max_delay=0.002):
        self.rng = random.Random(seed)
        self.units, self.max_delay = units, max_delay
        self.stops = [self.rng.randint(1, units) for _ in range(64)]
        self.lock = threading.Lock()

    def start(self, j):
        return Generation(index=j)

    def advance(self, gen, pub):
        with self.lock:
            delay = self.rng.uniform(0, self.max_delay)
        time.sleep(delay)
        gen.metrics.setdefault("versions", []).append(pub.version)
        gen.chunk += 1
        gen.done = gen.chunk >= self.stops[gen.index]

    def finish(self, gen):
        return list(gen.metrics["versions"])


def _drive(k, schedule, units, seed, steps=8, barriers=True):
    """The trainer's side: take batch i, check it, (sometimes) checkpoint, publish i+1."""
    rng = random.Random(seed + 1)
    work = FakeWork(units, seed)
    pipe = RolloutPipeline(work, max_staleness=k, schedule=schedule, units=units, steps=steps)
    pipe.publish(Published(version=0, params=None))
    pipe.start()
    consumed = []
    try:
        for i in range(steps):
            versions, _ = pipe.take(i, timeout=20)
            consumed.append(versions)
            time.sleep(rng.uniform(0, 0.003))
            pipe.publish(Published(version=i + 1, params=None))
            if barriers and rng.random() < 0.4:
                snap = pipe.barrier(i + 1, timeout=20)
                try:
                    if schedule == "fixed":   # every unit needing a version <= i is done
                        for j, gen in snap.inflight.items():
                            assert gen.done or pipe.required(j, gen.chunk) >= i + 1
                        if snap.next_batch < steps:
                            assert pipe.required(snap.next_batch, 0) >= i + 1
                    ready = {j: list(v) for j, v in snap.ready.items()}
                    time.sleep(rng.uniform(0, 0.002))     # the producer must stay put
                    assert {j: list(v) for j, v in pipe.ready.items()} == ready
                finally:
                    pipe.release()
    finally:
        pipe.stop()
    return consumed, pipe


@settings(max_examples=25, deadline=None)
@given(k=st.integers(0, 3), schedule=st.sampled_from(["fixed", "free"]),
       units=st.integers(1, 4), seed=st.integers(0, 10 ** 6))
def test_no_consumed_row_exceeds_the_staleness_bound(k, schedule, units, seed):
    consumed, pipe = _drive(k, schedule, units, seed)
    for i, versions in enumerate(consumed):
        assert i - k <= min(versions) and max(versions) <= i, (i, versions)
        assert versions == sorted(versions)             # a generation never goes back
        if schedule == "fixed":                         # a function of (batch, unit) only
            assert versions == [pipe.required(i, c) for c in range(len(versions))]


def test_fixed_schedule_spreads_partial_rollouts_over_versions():
    pipe = RolloutPipeline(FakeWork(4, 0), max_staleness=2, schedule="fixed", units=4, steps=8)
    assert [pipe.required(5, c) for c in range(4)] == [3, 3, 4, 4]
    assert [pipe.required(1, c) for c in range(4)] == [0, 0, 0, 0]
    k0 = RolloutPipeline(FakeWork(2, 0), max_staleness=0, schedule="fixed", units=2, steps=8)
    assert [k0.required(5, c) for c in range(2)] == [5, 5]


def test_producer_failure_reaches_the_trainer_and_stop_never_hangs():
    class Broken(FakeWork):
        def advance(self, gen, pub):
            raise ZeroDivisionError("reward blew up")

    pipe = RolloutPipeline(Broken(1, 0), max_staleness=1, schedule="fixed", units=1, steps=4)
    pipe.publish(Published(version=0, params=None))
    pipe.start()
    with pytest.raises(ProducerError, match="reward blew up") as info:
        pipe.take(0, timeout=10)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    # a producer blocked on a version that never comes is released by stop()
    waiting = RolloutPipeline(FakeWork(1, 0), max_staleness=0, schedule="free", units=1, steps=4)
    waiting.start()
    time.sleep(0.05)
    waiting.stop(timeout=5)
    assert not waiting.alive
    with pytest.raises(ProducerError, match="no rollout batch 0 after"):
        RolloutPipeline(FakeWork(1, 0), max_staleness=0, schedule="free", units=1,
                        steps=4).take(0, timeout=0.05)


# ----------------------------------------------------------------- a tiny trainer
class Pool:
    """Rewards that vary within a group: parity of the length, share of '1'."""

    def score(self, completions, problems):
        c = np.array([[float(len(t) % 2), t.count("1") / 4.0] for t in completions],
                     np.float32)
        return RewardResult(scores=c @ np.array([1.0, 0.5], np.float32), components=c,
                            names=("parity", "ones"), failed=np.zeros(len(c), bool), failures=0,
                            timeouts=0, errors=(), seconds=0.0)


def _problems(prefix=False):
    """12 two-digit prompts; with ``prefix`` every second has a 3-token forced
    completion prefix (longer than a one-token chunk)."""
    return [Problem(prompt=f"{i % 10}{(3 * i) % 10}", answer="0",
                    meta={"completion_prefix": "121"} if prefix and i % 2 == 0 else {})
            for i in range(12)]


def _trainer(tmp_path, cls=AsyncRLTrainer, *, steps=3, sampler_kw=None, objective=None,
             problems=None, pool=None, **kw):
    graphdef, params = api.init(config.model_config("tiny", vocab_size=13), seed=0)
    tx = optim.optimizer(learning_rate=3e-3)
    objective = objective or presets.grpo(kl_coef=0.0)
    problems = problems or _problems()
    rl = dict(steps=steps, prompts_per_step=P, checkpoint_every=None, eval_every=0,
              log_samples_every=0)
    rl.update(kw.pop("rl", {}))
    return cls(graphdef=graphdef,
               state=state_lib.create(params, tx, seed=0, objective_state=objective.init()),
               tx=tx, objective=objective, tokenizer=DigitTokenizer(),
               stream=ProblemStream(problems, seed=0), reward_pool=pool or Pool(),
               sampler=SamplerConfig(max_new_tokens=NEW, num_generations=G, stop_token_ids=(2,),
                                     completion_buckets=(NEW,), **(sampler_kw or {})),
               config=RLConfig(**rl), run_dir=str(tmp_path), **kw)


def _leaves(state):
    return jax.tree.leaves(jax.device_get(state))


def _same_state(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def test_k0_is_bitwise_identical_to_the_synchronous_trainer(tmp_path):
    sync = _trainer(tmp_path / "sync", RLTrainer)
    want = sync.run()
    sync.close()
    asy = _trainer(tmp_path / "async", async_config=AsyncConfig(max_staleness=0))
    got = asy.run()
    asy.close()
    assert _same_state(sync.state, asy.state)
    assert not _same_state(sync.state, _trainer(tmp_path / "init", RLTrainer).state)
    for w, g in zip(want, got):
        for k in ("reward_mean", "loss", "grad_norm", "response_length"):
            assert w[k] == g[k], k
        assert g["async/lag_max"] == 0 and g["offpolicy/gap_abs_mean"] < 1e-5
    assert not asy._pipeline.alive


def test_chunked_generation_with_unchanged_weights_equals_one_shot(tmp_path):
    """Chunks of one decode step, forced completion prefixes of three tokens: the
    continued generation is the one-shot generation, bitwise."""
    whole = _trainer(tmp_path / "a", problems=_problems(prefix=True),
                     async_config=AsyncConfig(max_staleness=0))
    chunked = _trainer(tmp_path / "b", problems=_problems(prefix=True), async_config=AsyncConfig(
        max_staleness=0, partial_rollouts=True, chunk_tokens=1))
    try:
        a, b = whole.collect(None), chunked.collect(None)
    finally:
        whole.close()
        chunked.close()
    assert chunked.units == NEW and b.reward_metrics["producer/chunks"] > 1
    for name in ("completion_ids", "completion_mask", "sampling_logprobs", "lengths",
                 "finished", "forced", "prompt_ids"):
        np.testing.assert_array_equal(getattr(b.rollout, name), getattr(a.rollout, name),
                                      err_msg=name)
    assert a.rollout.forced.any() and a.texts == b.texts and np.array_equal(a.rewards, b.rewards)
    np.testing.assert_array_equal(b.rollout.versions, np.where(a.rollout.completion_mask, 0, -1))


def _teacher_forced(trainer, params, rollout):
    tokens, mask, positions = rollout.sequences()
    seq = Sequences(tokens=tokens, attention_mask=mask, positions=positions)
    return np.asarray(steps_lib.token_outputs(trainer.graphdef, params, seq, NEW).logp)


def _run_recording(trainer):
    """Runs the trainer; returns every published parameter version, every collected
    batch and the history."""
    published, batches = [], []
    real_transfer, real_collect = trainer._transfer, trainer.collect

    def transfer(params):
        published.append(jax.device_get(params))
        return real_transfer(params)

    def collect(key):
        got = real_collect(key)
        batches.append(got)
        return got

    trainer._transfer, trainer.collect = transfer, collect
    history = trainer.run()
    trainer.close()
    return published, batches, history


def test_partial_rollouts_record_the_version_and_behaviour_of_every_token(tmp_path):
    """k = 2, two chunks of two tokens: chunk 0 of batch j is sampled by version
    j − 2, chunk 1 by j − 1; each token's sampler log-prob and exact old logit are
    those of the version that sampled it (checked against a teacher-forced forward
    with that version's recorded weights), not of the forced pass that re-feeds it."""
    trainer = _trainer(tmp_path, steps=5, async_config=AsyncConfig(
        max_staleness=2, partial_rollouts=True, chunk_tokens=2, old_logits="exact"))
    published, batches, history = _run_recording(trainer)
    assert len(published) == 5 and len(batches) == 5        # versions 0..4, batches 0..4
    multi = 0
    for j, got in enumerate(batches):
        r = got.rollout
        cm = np.asarray(r.completion_mask)
        want = np.where(np.arange(NEW) < 2, max(0, j - 2), max(0, j - 1))[None, :]
        np.testing.assert_array_equal(r.versions, np.where(cm, want, -1), err_msg=f"batch {j}")
        for v in np.unique(r.versions[cm]):
            sel = cm & (r.versions == v)
            ref = _teacher_forced(trainer, published[v], r)
            np.testing.assert_allclose(r.behaviour_logp[sel], ref[sel], atol=2e-5)
            # the sampler's log-prob (τ = 1, no truncation) of the same policy
            np.testing.assert_allclose(r.sampling_logprobs[sel], ref[sel], atol=2e-5)
        assert np.all(r.sampling_logprobs[cm] < 0)           # none is a forced pass's 0
        multi += int((cm.sum(-1) > 2).sum()) if j >= 2 else 0
        row = history[j]
        assert row["async/lag_max"] <= 2 and row["offpolicy/discrepancy_masked"] == 0.0
    assert multi > 0 and history[-1]["async/multi_version_rows"] > 0
    assert history[-1]["async/lag_mean"] > 1 and history[-1]["offpolicy/gap_abs_mean"] > 0


def test_exact_old_logits_mask_the_discrepancy_band_and_feed_the_staleness_factor(tmp_path):
    band = (0.405, 1.5)        # the top-4 mass of this tiny model is 0.38–0.46
    trainer = _trainer(tmp_path, sampler_kw={"top_k": 4}, async_config=AsyncConfig(
        max_staleness=1, old_logits="exact", discrepancy_band=band))
    try:
        got = trainer.collect(None)
        batch = jax.device_get(trainer.iteration_batch(got))
    finally:
        trainer.close()
    r = got.rollout
    loss = np.asarray(r.completion_mask) & ~np.asarray(r.forced)
    ratio = np.exp(np.float64(r.behaviour_logp) - r.sampling_logprobs)   # π_train / π_infer
    keep = loss & (ratio >= band[0]) & (ratio <= band[1])
    assert 0 < keep.sum() < loss.sum()                       # top-k truncation is caught
    np.testing.assert_array_equal(batch.mask, keep)
    np.testing.assert_array_equal(batch.sampler_logp, np.where(loss, r.behaviour_logp, 0))
    assert got.reward_metrics["offpolicy/discrepancy_masked"] == pytest.approx(
        1 - keep.sum() / loss.sum())


# ------------------------------------------------- revised PPO-EWMA (approximate)
WIDE = (0.0, 1e9)          # a band no ratio leaves (log-ratios are clamped at ±20)


def test_ewma_with_decay_zero_is_the_sampler_path_bitwise(tmp_path):
    """β = 0: the proximal parameters are the current ones bitwise, so with a band no
    ratio leaves, "ewma" is the "sampler" route with the separate old-policy pass."""
    sampler = _trainer(tmp_path / "s", steps=2, rl={"recompute_old_logp": True},
                       async_config=AsyncConfig(max_staleness=1))
    want = sampler.run()
    sampler.close()
    ewma = _trainer(tmp_path / "e", steps=2, async_config=AsyncConfig(
        max_staleness=1, old_logits="ewma", ewma_decay=0.0, discrepancy_band=WIDE))
    got = ewma.run()
    ewma.close()
    assert _same_state(sampler.state, ewma.state)
    assert _same_state(ewma.state.params, ewma._ewma["params"])
    for w, g in zip(want, got):
        for k in ("loss", "grad_norm", "reward_mean", "ratio/mean", "offpolicy/gap_abs_mean"):
            assert w[k] == g[k], k
        assert g["ewma/age"] == 0 and g["ewma/param_gap"] == 0
        assert g["offpolicy/proximal_masked"] == 0
    assert got[1]["async/lag_mean"] == 1 and got[1]["offpolicy/gap_abs_mean"] > 0


def _np_ewma(versions, decay):
    v = len(versions) - 1
    w = np.array([decay ** (v - i) for i in range(v + 1)])
    return jax.tree.map(lambda *xs: sum(wi * np.float64(x) for wi, x in zip(w, xs)) / w.sum(),
                        *versions), w.sum(), float((w * np.arange(v, -1, -1)).sum() / w.sum())


def test_ewma_proximal_policy_follows_its_formula_inside_the_loop(tmp_path):
    """k = 1, β = 0.5, three iterations: the EWMA state is the bias-corrected average of
    the parameter versions (float64 transcription from the published weights), it
    differs from the current and the behaviour parameters, the logged proximal gap is
    that of a teacher-forced forward with the transcribed EWMA, the PPO ratio is
    measured against it, and the update compiles once."""
    trainer = _trainer(tmp_path, steps=3, async_config=AsyncConfig(
        max_staleness=1, old_logits="ewma", ewma_decay=0.5))
    published, batches, history = _run_recording(trainer)
    assert len(published) == 3 and trainer.compilations == 1
    assert next(iter(trainer._compiled.values()))._cache_size() == 1     # traced once
    versions = published + [jax.device_get(trainer.state.params)]     # θ_0 … θ_3
    want, n, age = _np_ewma(versions, 0.5)
    got = jax.device_get(trainer._ewma)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(got["weight"]) == pytest.approx(n) and float(got["age"]) == pytest.approx(age)
    current, behaviour = jax.tree.leaves(versions[3]), jax.tree.leaves(versions[2])
    ewma = jax.tree.leaves(got["params"])
    assert not all(np.array_equal(a, b) for a, b in zip(ewma, current))
    assert not all(np.array_equal(a, b) for a, b in zip(ewma, behaviour))
    # iteration 2 used θ̄_2 = EWMA(θ_0, θ_1, θ_2) against batch 2 (sampled by version 1)
    prox_params, _, age2 = _np_ewma(versions[:3], 0.5)
    prox_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), prox_params)
    r = batches[2].rollout
    loss = np.asarray(r.completion_mask) & ~np.asarray(r.forced)
    prox = _teacher_forced(trainer, prox_params, r)
    gap = np.abs(np.float64(prox) - r.sampling_logprobs)[loss].mean()
    row = history[2]
    assert row["offpolicy/proximal_gap_abs_mean"] == pytest.approx(gap, abs=2e-5)
    assert row["offpolicy/gap_abs_mean"] == pytest.approx(gap, abs=2e-5)   # old_logp = π_prox
    assert row["ewma/age"] == pytest.approx(age2) and row["async/lag_mean"] == 1
    assert row["ewma/param_gap"] > 0 and row["ratio/mean"] != 1.0    # π_θ / π_prox ≠ 1
    for key in ("offpolicy/proximal_masked", "ewma/weight", "async/lag_max",
                "ratio/clip_frac_high", "offpolicy/kl_k3"):
        assert all(key in h for h in history), key


def test_ewma_band_drops_tokens_from_the_loss_mask(tmp_path):
    """A narrow band on π_prox/π_infer: the tokens outside it leave the loss (the
    logged fraction is that of the first iteration's ratios, π_prox = π_θ_0)."""
    band = (0.405, 1.5)        # the top-4 mass of this tiny model is 0.38–0.46
    trainer = _trainer(tmp_path, steps=1, sampler_kw={"top_k": 4}, async_config=AsyncConfig(
        max_staleness=1, old_logits="ewma", discrepancy_band=band))
    batches = []
    real_collect = trainer.collect

    def collect(key):
        got = real_collect(key)
        batches.append(got)
        return got

    trainer.collect = collect
    row = trainer.run()[0]
    _, params0 = api.init(config.model_config("tiny", vocab_size=13), seed=0)   # version 0
    trainer.close()
    r = batches[0].rollout
    loss = np.asarray(r.completion_mask) & ~np.asarray(r.forced)
    ratio = np.exp(np.float64(_teacher_forced(trainer, params0, r)) - r.sampling_logprobs)
    keep = loss & (ratio >= band[0]) & (ratio <= band[1])
    assert 0 < keep.sum() < loss.sum()
    assert row["offpolicy/proximal_masked"] == pytest.approx(1 - keep.sum() / loss.sum())
    assert row["ratio/valid_tokens"] == keep.sum()


def test_ewma_checkpoint_resumes_bitwise(tmp_path):
    """The EWMA state is saved beside the policy ("ewma") and restored: a run saved
    after iteration 1 and resumed ends bitwise where the uninterrupted run ends, EWMA
    included."""
    cfg = AsyncConfig(max_staleness=1, old_logits="ewma", ewma_decay=0.5)
    ref = _trainer(tmp_path / "ref", steps=2, async_config=cfg)
    want = ref.run()
    ref.close()
    first = _trainer(tmp_path / "run", steps=2, async_config=cfg)
    first.iteration()
    first.save(force=True)
    first.checkpointer.wait()
    first.close()
    assert '"ewma"' in (tmp_path / "run" / "checkpoints" / "1" / "state" / "_METADATA").read_text()
    again = _trainer(tmp_path / "run", steps=2, async_config=cfg)
    fresh = jax.device_get(again._ewma)
    got = again.run()
    again.close()
    assert _same_state(again.state, ref.state) and _same_state(again._ewma, ref._ewma)
    assert not _same_state(again._ewma, fresh)            # restored, not re-initialised
    assert got[0]["loss"] == want[1]["loss"] and got[0]["ewma/age"] == want[1]["ewma/age"]


def test_staleness_guard_refuses_tokens_older_than_k(tmp_path):
    trainer = _trainer(tmp_path, async_config=AsyncConfig(max_staleness=2))
    t = np.arange(NEW)[None, :]
    lengths = np.array([4, 2])
    cm = t < lengths[:, None]
    rollout = VersionedRollout(
        prompt_ids=np.ones((2, 3), np.int32), prompt_mask=np.ones((2, 3), bool),
        completion_ids=np.zeros((2, NEW), np.int32), completion_mask=cm,
        sampling_logprobs=np.zeros((2, NEW), np.float32), policy_logprobs=None, lengths=lengths,
        finished=np.ones(2, bool), truncated=np.zeros(2, bool), group_id=np.zeros(2, np.int32),
        forced=np.zeros((2, NEW), bool), decode_steps=np.int32(4),
        versions=np.where(cm, np.array([[3, 3, 4, 4], [5, 5, 0, 0]]), -1))
    m = trainer.staleness_metrics(rollout, 5)
    assert m["async/lag_max"] == 2 and m["async/multi_version_rows"] == 0.5
    assert m["async/lag_mean"] == pytest.approx(np.mean([2, 2, 1, 1, 0, 0]))
    with pytest.raises(StalenessError, match=r"versions 3\.\.5 \(rows \[0\]\); allowed 4\.\.6"):
        trainer.staleness_metrics(rollout, 6)
    with pytest.raises(StalenessError, match="allowed 2..4"):
        trainer.staleness_metrics(rollout, 4)                 # a token from the future
    trainer.close()


# ------------------------------------------------------------ weight publishing
def _hang(params):
    time.sleep(60)


def _raise(params):
    raise OSError("device link down")


@pytest.mark.parametrize("inject,match", [
    ("corrupt", r"policy version 1 arrived corrupted .* checksum mismatch at \['"),
    ("hang", r"publishing policy version 0 .* did not finish within 0.5 s"),
    ("raise", r"publishing policy version 0 .* failed: OSError: device link down"),
])
def test_failed_weight_transfer_stops_the_run_with_a_clear_error(tmp_path, inject, match):
    trainer = _trainer(tmp_path, steps=3, async_config=AsyncConfig(
        max_staleness=1, publish_timeout_s=0.5 if inject == "hang" else 120.0))
    if inject == "corrupt":          # mid-run: version 0 goes through, version 1 is corrupted
        calls = []

        def transfer(params):
            out = AsyncRLTrainer._transfer(trainer, params)
            calls.append(1)
            if len(calls) == 2:
                leaves, treedef = jax.tree.flatten(out)
                leaves[3] = leaves[3].at[(0,) * leaves[3].ndim].add(1.0)
                out = jax.tree.unflatten(treedef, leaves)
            return out
        trainer._transfer = transfer
    else:
        trainer._transfer = {"hang": _hang, "raise": _raise}[inject]
    t0 = time.monotonic()
    with pytest.raises(WeightTransferError, match=match):
        trainer.run()
    assert time.monotonic() - t0 < 60
    pipe = trainer._pipeline
    deadline = time.monotonic() + 10
    while pipe.alive and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pipe.alive                                    # the producer was stopped
    bad = 1 if inject == "corrupt" else 0
    assert pipe.newest_used < bad                            # nothing sampled from it
    assert int(jax.device_get(trainer.state.step)) == bad         # stopped right there
    trainer.close()


# ------------------------------------------------------------------ checkpoints
class HalfZeroPool(Pool):
    """Groups of prompts with an even first digit all score 0 (zero variance), so
    DAPO dynamic sampling needs several rounds."""

    def score(self, completions, problems):
        out = super().score(completions, problems)
        zero = np.array([int(q.prompt[0]) % 2 == 0 for q in problems])
        return dataclasses.replace(out, scores=np.where(zero, 0.0, out.scores).astype(np.float32))


def test_dynamic_sampling_batches_keep_versions_and_survive_the_queue_encoding(tmp_path):
    """k = 2 with DAPO dynamic sampling: batches 0–2 are sampled with version 0 over
    several rounds; the queue a checkpoint stores decodes, with its problems drawn
    again from the stream, into the same batches."""
    cfg = AsyncConfig(max_staleness=2)
    rl = {"dynamic_sampling": True, "max_sampling_rounds": 3}
    producer = _trainer(tmp_path / "a", pool=HalfZeroPool(), async_config=cfg, rl=rl)
    producer._ensure_pipeline()
    snap = producer._pipeline.barrier(1, timeout=120)        # version 1 is not published
    try:
        data_state, payload = producer._encode_queue(snap)
    finally:
        producer._pipeline.release()
        producer.close()
    assert sorted(snap.ready) == [0, 1, 2] and not snap.inflight
    rounds = [snap.ready[j].collected.reward_metrics["dynamic_sampling/rounds"] for j in range(3)]
    assert max(rounds) > 1
    restored = _trainer(tmp_path / "b", pool=HalfZeroPool(), async_config=cfg, rl=rl)
    restored.stream.set_state(data_state)
    back = restored._decode_queue(json.loads(json.dumps(payload)), data_state)
    restored.close()
    assert back["next_batch"] == 3 and sorted(back["ready"]) == [0, 1, 2]
    for j in range(3):
        want, got = snap.ready[j].collected, back["ready"][j].collected
        cm = np.asarray(want.rollout.completion_mask)
        np.testing.assert_array_equal(want.rollout.versions, np.where(cm, 0, -1))
        for name in ("completion_ids", "sampling_logprobs", "versions", "prompt_ids",
                     "group_id", "lengths"):
            np.testing.assert_array_equal(getattr(got.rollout, name),
                                          getattr(want.rollout, name), err_msg=name)
        np.testing.assert_array_equal(got.rewards, want.rewards)
        assert got.texts == want.texts and got.problems == want.problems
    # a queue saved with another staleness bound is not used
    assert restored._decode_queue({**payload, "max_staleness": 1}, data_state) == {}


def test_checkpoint_with_rollouts_in_flight_resumes_to_the_same_run(tmp_path):
    """Saved after iteration 2 with batches 3–4 finished or half-generated in the
    queue; a new trainer restores the queue and ends bitwise where the uninterrupted
    run ends."""
    cfg = AsyncConfig(max_staleness=2, partial_rollouts=True, chunk_tokens=2)
    ref = _trainer(tmp_path / "ref", steps=5, async_config=cfg)
    want = ref.run()
    ref.close()
    first = _trainer(tmp_path / "run", steps=5, async_config=cfg)
    first.iteration()
    first.iteration()
    first.save(force=True)
    first.checkpointer.wait()
    first.close()
    extra = json.loads((tmp_path / "run" / "checkpoints" / "2" / "extra" / "metadata")
                       .read_text())
    queue = extra["async_queue"]["batches"]
    assert [e["index"] for e in queue] and queue[0]["index"] == 2
    assert any(e["state"] == "running" for e in queue) or len(queue) >= 2
    again = _trainer(tmp_path / "run", steps=5, async_config=cfg)
    got = again.run()
    again.close()
    assert _same_state(again.state, ref.state)
    assert [r["reward_mean"] for r in got] == [r["reward_mean"] for r in want[2:]]
    assert [r["async/lag_mean"] for r in got] == [r["async/lag_mean"] for r in want[2:]]


def test_free_schedule_checkpoint_resumes_its_queue(tmp_path):
    """The free schedule pauses between two chunks for a checkpoint; a new trainer
    continues whatever was queued (finished or half-generated) within the bound."""
    cfg = AsyncConfig(max_staleness=1, schedule="free", partial_rollouts=True, chunk_tokens=1)
    first = _trainer(tmp_path, steps=5, async_config=cfg)
    first.iteration()
    first.iteration()
    first.save(force=True)
    first.checkpointer.wait()
    first.close()
    extra = json.loads((tmp_path / "checkpoints" / "2" / "extra" / "metadata").read_text())
    queued = {e["index"]: e["state"] for e in extra["async_queue"]["batches"]}
    assert set(queued) <= {2, 3}
    again = _trainer(tmp_path, steps=5, async_config=cfg)
    history = again.run()
    again.close()
    assert len(history) == 3 and all(r["async/lag_max"] <= 1 for r in history)
    assert int(jax.device_get(again.state.step)) == 5


def _start(script, *args, env=None, log):
    full = {k: v for k, v in os.environ.items() if not k.startswith("RLX_TEST_")}
    full.update(env or {})
    f = open(log, "ab")
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], env=full, stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file, proc.log_path = f, log
    return proc


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.log_file.close()


def _finish(proc, timeout=300):
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _kill(proc)
    assert rc == 0, Path(proc.log_path).read_text()[-4000:]


def _wait_for(proc, marker, timeout=300):
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError("run ended before its pause hook fired:\n"
                                 + Path(proc.log_path).read_text()[-4000:])
        time.sleep(0.05)


def test_sigkilled_async_run_restarts_bitwise(tmp_path):
    """k = 2 with partial rollouts, a checkpoint every iteration: SIGKILLed after the
    update of iteration 3 (its batch consumed, later batches finished or half-generated
    in the queue, the newest checkpoint 2, whose queue holds batches 2–4), then
    restarted: the final state equals the uninterrupted run's bitwise. (A kill in the
    middle of an orbax save is ``test_resume.py``'s; the queue lives in the same
    atomically renamed step.)"""
    script = SCRIPTS / "async_resume_run.py"
    cache = tmp_path / "jax_cache"
    ref = _start(script, tmp_path / "ref", tmp_path / "ref.npz", log=tmp_path / "ref.log")
    run = tmp_path / "run"
    try:
        marker = tmp_path / "paused"
        proc = _start(script, run, tmp_path / "run.npz", log=tmp_path / "run.log",
                      env={"RLX_TEST_CACHE": str(cache), "RLX_TEST_PAUSE": "step:3",
                           "RLX_TEST_MARKER": str(marker)})
        _wait_for(proc, marker)
        assert "in flight" in marker.read_text()
        _kill(proc)
        steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
        assert steps == [1, 2]
        queue = json.loads((run / "checkpoints" / "2" / "extra" / "metadata").read_text())
        assert queue["async_queue"]["batches"][0]["index"] == 2
        _finish(_start(script, run, tmp_path / "run.npz", log=tmp_path / "run.log",
                       env={"RLX_TEST_CACHE": str(cache)}))
        _finish(ref)
    finally:
        _kill(ref)
    want, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
    assert sorted(want.files) == sorted(got.files) and any("params" in k for k in want.files)
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    ref_rows = {json.loads(x)["step"]: json.loads(x)
                for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()}
    assert sorted(rows) == sorted(ref_rows) == list(range(1, 7))
    for s in rows:
        for k in ("reward_mean", "grad_norm", "async/lag_mean"):
            assert rows[s][k] == ref_rows[s][k], (s, k)
    assert ref_rows[6]["async/lag_max"] == 2


def test_split_placement_on_8_simulated_devices(tmp_path):
    """4 rollout + 4 training devices: published weights live on the rollout devices,
    the training state on the training ones, and the run respects the bound."""
    out = tmp_path / "split.json"
    proc = _start(SCRIPTS / "async_split.py", out, log=tmp_path / "split.log")
    _finish(proc)
    got = json.loads(out.read_text())
    assert got["train_devices"] == [0, 1, 2, 3] and got["rollout_devices"] == [4, 5, 6, 7]
    assert got["published_on"] == [4, 5, 6, 7] and got["state_on"] == [0, 1, 2, 3]
    assert got["lag_max"] <= 1 and got["lag_mean"] > 0 and got["params_changed"]
    assert got["corrupted_error"].startswith("policy version")
