"""LearnedReward: a reward model behind the reward pool's score() contract."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.data.records import PreferencePair
from rlx.data.tokenizer import train_sentencepiece
from rlx.models import api
from rlx.models.config import model_config
from rlx.rewards.learned import LearnedReward
from rlx.rewards.pool import RewardPool
from rlx.tasks import get_task
from rlx.train import preference as pf


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    task = get_task("arithmetic", digits=(1, 2))
    problems = task.train(40, seed=0)
    tok = train_sentencepiece([q.prompt + q.answer for q in task.train(200, seed=0)],
                              vocab_size=40,
                              model_prefix=str(tmp_path_factory.mktemp("tok") / "tok"))
    cfg = model_config("tiny", vocab_size=tok.vocab_size, num_layers=1)
    graphdef, params = api.init(cfg, kind="reward", seed=3)
    # a non-zero head so scores differ between sequences
    params["head"]["kernel"] = params["head"]["kernel"] + 0.5
    return task, problems, tok, graphdef, params


def _texts(problems, n):
    rng = random.Random(0)
    return [q.answer if i % 2 else str(int(q.answer) + rng.randint(1, 9))
            for i, q in enumerate(problems[:n])]


def test_scores_match_the_reward_model_forward_on_the_same_tokens(rm):
    task, problems, tok, graphdef, params = rm
    texts = _texts(problems, 12)
    pairs = [PreferencePair(q.prompt, t, t) for q, t in zip(problems, texts)]
    batch = pf.pairs_to_batch(tok, pairs)
    expect = api.rewards(graphdef, params, batch.chosen.tokens, batch.chosen.positions,
                         batch.chosen.attention_mask)
    result = LearnedReward(graphdef, params, tok, batch_size=8).score(texts, problems[:12])
    assert result.scores.shape == (12,) and result.components.shape == (12, 1)
    np.testing.assert_allclose(result.scores, np.asarray(expect), rtol=1e-5, atol=1e-5)
    assert result.names == ("learned",) and not result.failed.any()
    metrics = result.metrics()
    assert metrics["reward/mean"] == pytest.approx(float(np.mean(result.scores)))
    assert metrics["reward/learned"] == pytest.approx(metrics["reward/mean"])
    assert metrics["reward/failures"] == 0.0


def test_score_of_a_sample_does_not_depend_on_its_batch(rm):
    _, problems, tok, graphdef, params = rm
    texts = _texts(problems, 10)
    # one long sample lands in a wider bucket than the rest
    long_q = problems[10].__class__(prompt="1+" * 12 + "1=", answer="13")
    reward = LearnedReward(graphdef, params, tok, batch_size=4, widths=(16, 32, 64))
    alone = [reward.score([t], [q]).scores[0] for t, q in zip(texts, problems)]
    order = list(range(10))[::-1]
    mixed = reward.score([texts[i] for i in order] + ["13"],
                         [problems[i] for i in order] + [long_q]).scores
    np.testing.assert_allclose(mixed[:10][::-1], alone, rtol=0, atol=1e-6)
    # a different chunk size changes nothing either
    other = LearnedReward(graphdef, params, tok, batch_size=3, widths=(16, 32, 64))
    np.testing.assert_allclose(other.score(texts, problems[:10]).scores, alone, atol=1e-5)


def test_long_sequences_keep_their_last_tokens(rm):
    _, problems, tok, graphdef, params = rm
    q = problems[0].__class__(prompt="9+" * 20 + "9=", answer="189")
    reward = LearnedReward(graphdef, params, tok, batch_size=2, widths=(8, 16))
    ids = reward.encode(q.prompt, "189")
    assert len(ids) == 16 and ids[-1] == tok.eos_id
    full = [tok.bos_id] + tok.encode(q.prompt) + tok.encode("189") + [tok.eos_id]
    assert ids == full[-16:]
    tokens = jnp.asarray([ids], jnp.int32)
    expect = api.rewards(graphdef, params, tokens, jnp.arange(16)[None], jnp.ones((1, 16), bool))
    np.testing.assert_allclose(reward.score(["189"], [q]).scores, np.asarray(expect),
                               atol=1e-5)


def test_failures_are_isolated_and_counted(rm):
    _, problems, tok, graphdef, params = rm
    reward = LearnedReward(graphdef, params, tok, batch_size=4, failure_value=-1.0)
    texts = _texts(problems, 4)
    good = reward.score(texts, problems[:4]).scores
    broken = reward.score([texts[0], None, texts[2], texts[3]], problems[:4])
    assert broken.failed.tolist() == [False, True, False, False]
    assert broken.failures == 1 and broken.scores[1] == -1.0
    np.testing.assert_allclose(broken.scores[[0, 2, 3]], good[[0, 2, 3]], atol=1e-6)
    assert "sample 1" in broken.errors[0]
    # a model that outputs NaN: every sample fails, none raises
    nan_params = jax.tree.map(lambda x: x, params)
    nan_params["head"]["bias"] = nan_params["head"]["bias"] * jnp.nan
    nan_result = LearnedReward(graphdef, nan_params, tok, batch_size=4).score(texts, problems[:4])
    assert nan_result.failed.all() and nan_result.failures == 4
    assert np.isfinite(nan_result.scores).all() and "non-finite" in nan_result.errors[0]
    with pytest.raises(ValueError, match="completions has 1 entries but problems has 2"):
        reward.score(["1"], problems[:2])
    assert reward.score([], []).scores.shape == (0,)


def test_normalisation_modes(rm):
    _, problems, tok, graphdef, params = rm
    texts = _texts(problems, 8)
    raw = LearnedReward(graphdef, params, tok, batch_size=8).score(texts, problems[:8]).scores
    assert np.isfinite(raw).all() and np.ptp(raw) > 0
    batch = LearnedReward(graphdef, params, tok, batch_size=8, normalize="batch")
    z = batch.score(texts, problems[:8]).scores
    np.testing.assert_allclose(z, (raw - raw.mean()) / (raw.std() + 1e-6), atol=1e-4)
    fixed = LearnedReward(graphdef, params, tok, batch_size=8, normalize="fixed", mean=0.5,
                          std=2.0)
    np.testing.assert_allclose(fixed.score(texts, problems[:8]).scores, (raw - 0.5) / 2.0,
                               atol=1e-5)
    for bad, match in (({"normalize": "rank"}, "normalize must be one of"),
                       ({"std": 0.0}, "std must be finite and > 0"),
                       ({"widths": (32, 16)}, "strictly increasing"),
                       ({"batch_size": 0}, "batch_size must be >= 1")):
        with pytest.raises(ValueError, match=match):
            LearnedReward(graphdef, params, tok, **bad)


def test_verifiable_monitor_is_reported_but_never_scored(rm):
    task, problems, tok, graphdef, params = rm
    texts = _texts(problems, 8)
    plain = LearnedReward(graphdef, params, tok, batch_size=8).score(texts, problems[:8])
    pool = RewardPool(task.reward_spec(), backend="inline")
    with LearnedReward(graphdef, params, tok, batch_size=8, monitor=pool) as reward:
        watched = reward.score(texts, problems[:8])
    np.testing.assert_array_equal(watched.scores, plain.scores)
    metrics = watched.metrics()
    assert metrics["reward/verifiable/mean"] == pytest.approx(0.5)   # every other is right
    assert metrics["reward/verifiable/numeric_exact_match"] == pytest.approx(0.5)
