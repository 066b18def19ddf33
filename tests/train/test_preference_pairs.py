"""Preference pairs from verifiable tasks, their batches, and the RM / DPO loops."""

import random

import jax
import numpy as np
import pytest

from rlx.data.records import PreferencePair
from rlx.data.tokenizer import train_sentencepiece
from rlx.models import api
from rlx.models.config import model_config
from rlx.tasks import get_task
from rlx.recipes import preference_data as pd
from rlx.train import preference as pf

TASKS = [("arithmetic", {"digits": (1, 3)}), ("countdown", {}), ("sorting", {})]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An arithmetic task, a SentencePiece tokenizer, 16 fixed training pairs and a
    tiny model config shared by the tests below."""
    task = get_task("arithmetic", digits=(1, 2))
    problems = task.train(200, seed=0)
    tok = train_sentencepiece([q.prompt + q.answer for q in problems], vocab_size=40,
                              model_prefix=str(tmp_path_factory.mktemp("tok") / "tok"))
    pairs = pd.make_preference_pairs(task, problems[:16], rng=random.Random(0))
    cfg = model_config("tiny", vocab_size=tok.vocab_size, num_layers=1)
    return task, tok, pairs, cfg


@pytest.mark.parametrize("name,kwargs", TASKS)
def test_chosen_is_verified_correct_and_rejected_verified_wrong(name, kwargs):
    task = get_task(name, **kwargs)
    problems = task.train(30, seed=1)
    pairs = pd.make_preference_pairs(task, problems, rng=random.Random(0), pairs_per_problem=2)
    assert len(pairs) >= 40
    spec = task.reward_spec()
    for p in pairs:
        q = p.meta["problem"]
        assert p.prompt == q.prompt and p.chosen == task.demonstration(q)
        assert spec.score(p.chosen, q)[0] == 1.0
        assert spec.score(p.rejected, q)[0] == 0.0, (p.prompt, p.rejected)
    per_problem = {}
    for p in pairs:
        per_problem.setdefault(p.prompt, []).append(p.rejected)
    assert all(len(set(r)) == len(r) for r in per_problem.values())   # distinct rejects
    again = pd.make_preference_pairs(task, problems, rng=random.Random(0), pairs_per_problem=2)
    assert [(p.prompt, p.rejected) for p in again] == [(p.prompt, p.rejected) for p in pairs]


def test_corruption_kinds_make_the_documented_edits():
    rng = random.Random(0)
    for _ in range(50):
        out = pd.corrupt("x 40 y", "offset", rng)
        assert out.startswith("x ") and out.endswith(" y")
        assert 1 <= abs(int(out[2:-2]) - 40) <= 3
    assert pd.corrupt("123", "digit_swap", rng) in ("213", "132")
    assert pd.corrupt("77", "digit_swap", rng) is None        # nothing differs to swap
    assert pd.corrupt("1 2", "number_swap", rng) == "2 1"
    assert pd.corrupt("5 5", "number_swap", rng) is None
    assert pd.corrupt("56", "format", rng) in ("5", "6", "5656")
    for kind in pd.CORRUPTIONS:
        assert pd.corrupt("no digits", kind, rng) is None
    with pytest.raises(ValueError, match="corruption kind 'typo'"):
        pd.corrupt("1", "typo", rng)
    task = get_task("arithmetic")
    with pytest.raises(ValueError, match="corruptions=.*typo"):
        pd.make_preference_pairs(task, task.train(2), rng=rng, corruptions=("typo",))
    with pytest.raises(ValueError, match="pairs_per_problem must be >= 1"):
        pd.make_preference_pairs(task, task.train(2), rng=rng, pairs_per_problem=0)


def test_problem_whose_demonstration_fails_the_verifier_is_skipped():
    from rlx.tasks import Problem

    class BadData:                         # e.g. a user file with a wrong answer field
        reward_spec = get_task("arithmetic").reward_spec

        def demonstration(self, q, rng=None):
            return q.meta["written"]

    bad = Problem("1+1=", "2", {"written": "3"})
    good = Problem("1+2=", "3", {"written": "3"})
    pairs = pd.make_preference_pairs(BadData(), [bad, good], rng=random.Random(0))
    assert {p.prompt for p in pairs} == {"1+2="}


def test_pair_batch_layout_marks_response_and_eos(setup):
    _, tok, _, _ = setup
    pairs = [PreferencePair("12+3=", "15", "16"), PreferencePair("1+1=", "2", "22")]
    batch = pf.pairs_to_batch(tok, pairs, width=16)
    assert batch.chosen.tokens.shape == batch.rejected.tokens.shape == (2, 16)
    for i, p in enumerate(pairs):
        for seq, mask, text in ((batch.chosen, batch.chosen_mask, p.chosen),
                                (batch.rejected, batch.rejected_mask, p.rejected)):
            expect = [tok.bos_id] + tok.encode(p.prompt) + tok.encode(text) + [tok.eos_id]
            n = len(expect)
            assert np.asarray(seq.tokens[i, :n]).tolist() == expect
            assert np.asarray(seq.attention_mask[i]).tolist() == [True] * n + [False] * (16 - n)
            start = 1 + len(tok.encode(p.prompt))
            assert np.flatnonzero(np.asarray(mask[i])).tolist() == list(range(start, n))
    assert float(np.abs(np.asarray(batch.ref_chosen_logp)).sum()) == 0.0
    assert pf.pair_width(tok, pairs) % 8 == 0
    with pytest.raises(ValueError, match="exceed width=4"):
        pf.pairs_to_batch(tok, pairs, width=4)
    with pytest.raises(ValueError, match="empty response"):
        pf.pairs_to_batch(tok, [PreferencePair("1+1=", "", "3")], width=16)


def test_reference_logprobs_are_the_summed_response_logprobs(setup):
    _, tok, pairs, cfg = setup
    graphdef, params = api.init(cfg, seed=1)
    batch = pf.with_reference_logprobs(graphdef, params, pf.pairs_to_batch(tok, pairs[:4]),
                                       chunk=3)       # two chunks: 3 + 1 rows
    # independent float64 transcription: log_softmax of the logits at t-1, summed over
    # the response tokens (eos included).
    logits = np.asarray(api.logits(graphdef, params, batch.chosen.tokens,
                                   batch.chosen.positions, batch.chosen.attention_mask),
                        np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                            keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tokens, mask = np.asarray(batch.chosen.tokens), np.asarray(batch.chosen_mask)
    expect = [sum(logp[i, t - 1, tokens[i, t]] for t in np.flatnonzero(mask[i]))
              for i in range(4)]
    np.testing.assert_allclose(np.asarray(batch.ref_chosen_logp), expect, rtol=1e-4)


def test_reward_model_learns_to_separate_a_fixed_set_of_pairs(setup):
    _, tok, pairs, cfg = setup
    batch = pf.pairs_to_batch(tok, pairs)
    graphdef, params = api.init(cfg, kind="reward", seed=0)
    trained, report = pf.train_reward_model(graphdef, params, batch, batch, steps=60,
                                            batch_size=16, lr=1e-2, log_every=30)
    assert report["rm/accuracy_before"] <= 0.75
    assert report["rm/accuracy"] >= 0.9 and report["rm/accuracy"] > report["rm/accuracy_before"]
    assert report["rm/margin"] > 0
    assert [r["step"] for r in report["history"]] == [30, 60]
    assert report["history"][-1]["rm_loss"] < report["history"][0]["rm_loss"]
    with pytest.raises(ValueError, match="batch_size=32 exceeds the 16 training pairs"):
        pf.train_reward_model(graphdef, params, batch, batch, steps=1, batch_size=32)


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_dpo_raises_the_chosen_vs_rejected_margin(setup, loss):
    _, tok, pairs, cfg = setup
    batch = pf.pairs_to_batch(tok, pairs)
    graphdef, params = api.init(cfg, seed=0)
    reference = jax.tree.map(lambda x: x.copy(), params)
    trained, report = pf.train_dpo(graphdef, params, reference, batch, batch, steps=15,
                                   batch_size=8, lr=3e-3, loss=loss, log_every=15,
                                   beta=0.1 if loss == "dpo" else 2.0)
    assert report["pref/margin_before"] == 0.0 and report["pref/accuracy_before"] == 0.0
    assert report["pref/margin"] > 0.5
    assert report["pref/accuracy"] >= 0.8
    assert report["pref/logp_accuracy"] >= report["pref/logp_accuracy_before"]
    # the reference was not touched by training (only the policy moved)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), reference, params)
    assert all(jax.tree.leaves(same))
