"""RLTrainer: dynamic sampling keeps only informative groups, metrics and timings."""

import jax
import numpy as np
import pytest

from rlx.data.tokenizer import Tokenizer
from rlx.models import api, config
from rlx.objectives import presets
from rlx.rewards.pool import RewardResult
from rlx.sampling.config import SamplerConfig
from rlx.tasks import Problem
from rlx.train import optim, state as st
from rlx.train.data import ProblemStream
from rlx.train.rl import RLConfig, RLTrainer

G = 4


class DigitTokenizer(Tokenizer):
    """One id per digit character; 0 pad, 1 bos, 2 eos."""

    @property
    def vocab_size(self):
        return 13

    @property
    def bos_id(self):
        return 1

    @property
    def eos_id(self):
        return 2

    @property
    def pad_id(self):
        return 0

    def _encode(self, text):
        return [3 + int(c) for c in text if c.isdigit()]

    def decode(self, ids, *, skip_special=True):
        return "".join(str(i - 3) for i in map(int, ids) if i >= 3)


class ScriptedPool:
    """Rewards by prompt: prompts starting with '1' get mixed rewards (informative
    groups), every other prompt gets all-zero rewards (zero variance)."""

    def __init__(self):
        self.calls = 0

    def score(self, completions, problems):
        self.calls += 1
        scores = np.array([float(p.prompt.startswith("1") and i % 2 == 0)
                           for i, p in enumerate(problems)], np.float32)
        return RewardResult(scores=scores, components=scores[:, None], names=("scripted",),
                            failed=np.zeros(len(scores), bool), failures=0, timeouts=0,
                            errors=(), seconds=0.0)


def _trainer(tmp_path, problems, **cfg):
    mcfg = config.model_config("tiny", vocab_size=13)
    graphdef, params = api.init(mcfg, seed=0)
    tx = optim.optimizer(learning_rate=1e-3)
    objective = presets.dapo(max_length=4, overlong_buffer=2)
    pool = ScriptedPool()
    trainer = RLTrainer(
        graphdef=graphdef, state=st.create(params, tx, objective_state=objective.init()),
        tx=tx, objective=objective, tokenizer=DigitTokenizer(),
        stream=ProblemStream(problems, seed=0), reward_pool=pool,
        sampler=SamplerConfig(max_new_tokens=4, num_generations=G, stop_token_ids=(2,),
                              completion_buckets=(4,)),
        config=RLConfig(steps=1, prompts_per_step=2, checkpoint_every=None, **cfg),
        run_dir=str(tmp_path))
    return trainer, pool


def test_dynamic_sampling_keeps_drawing_until_groups_are_informative(tmp_path):
    problems = [Problem(prompt=f"{d}{d}", answer="0", meta={}) for d in range(10)]
    trainer, pool = _trainer(tmp_path, problems, dynamic_sampling=True, max_sampling_rounds=10)
    got = trainer.collect(jax.random.key(0))
    assert got.rewards.shape == (2, G)
    # only prompt "11" is informative: it is kept (once per time it was drawn) and
    # filler groups complete the static batch shape only after max rounds
    kept = got.reward_metrics["dynamic_sampling/kept_groups"]
    assert kept >= 1
    assert got.reward_metrics["dynamic_sampling/rounds"] == pool.calls
    assert any(np.ptp(r) > 0 for r in got.rewards)
    assert got.problems[0].prompt == "11"
    trainer.close()


def test_without_dynamic_sampling_one_round_is_drawn(tmp_path):
    problems = [Problem(prompt=f"{d}{d}", answer="0", meta={}) for d in range(10)]
    trainer, pool = _trainer(tmp_path, problems)
    trainer.collect(jax.random.key(0))
    assert pool.calls == 1
    trainer.close()


def test_iteration_reports_time_split_and_throughput(tmp_path):
    problems = [Problem(prompt=f"{d}{d}", answer="0", meta={}) for d in range(10)]
    trainer, _ = _trainer(tmp_path, problems)
    metrics = trainer.iteration()
    for key in ("time/generate", "time/decode", "time/reward", "time/update", "time/host",
                "time/iteration", "tokens_per_s", "loss", "ratio/mean", "grad_norm"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert "perf/update_mfu" not in metrics          # CPU: no peak FLOP/s known
    trainer.close()
