"""Preference batches and the RM / DPO loops (``rlx.train.preference``); the pair
synthesis is tested in ``tests/recipes/test_preference_data.py``."""

import random

import jax
import numpy as np
import pytest

from rlx.data.records import PreferencePair
from rlx.data.tokenizer import train_sentencepiece
from rlx.models import api
from rlx.models.config import model_config
from rlx.recipes import preference_data as pd
from rlx.tasks import get_task
from rlx.train import preference as pf


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
