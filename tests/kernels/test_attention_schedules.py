"""Block schedules, the masks they imply, and Prefix Grouper packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlx_kernels import attention_schedules as sl


def _blockify(mask, bq, bk, sp):
    """[..., S, S] element mask → [..., nq, nk] 'any allowed pair' block mask."""
    s = mask.shape[-1]
    full = np.zeros(mask.shape[:-2] + (sp, sp), bool)
    full[..., :s, :s] = mask
    nq, nk = sp // bq, sp // bk
    return full.reshape(mask.shape[:-2] + (nq, bq, nk, bk)).any(axis=(-3, -1))


def _numpy_token_mask(seg):
    """Independent transcription of formulas.md §9 'single-call equivalent'."""
    b, s = seg.shape
    out = np.zeros((b, 1, s, s), bool)
    for r in range(b):
        for a in range(s):
            for c in range(s):
                sa, sc = seg[r, a], seg[r, c]
                if sa < 0 or sc < 0 or c > a:
                    continue
                out[r, 0, a, c] = sc == 0 or sc == sa
    return out


def test_padded_length_and_block_validation():
    assert sl.padded_length(21, 8, 4) == 24
    assert sl.padded_length(16, 8, 16) == 16
    with pytest.raises(ValueError, match="multiple"):
        sl.padded_length(10, 8, 12)
    with pytest.raises(ValueError, match="block_q"):
        sl.padded_length(10, 0, 8)


@pytest.mark.parametrize("s,bq,bk", [(21, 8, 4), (16, 4, 8), (5, 8, 8)])
def test_causal_block_mask_is_blockified_causal_mask(s, bq, bk):
    sp = sl.padded_length(s, bq, bk)
    expected = _blockify(np.tril(np.ones((sp, sp), bool)), bq, bk, sp)
    np.testing.assert_array_equal(sl.causal_block_mask(s, block_q=bq, block_k=bk)[0, 0], expected)


def test_token_mask_matches_prefix_grouper_rule():
    seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 3, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1]])
    np.testing.assert_array_equal(np.asarray(sl.token_mask(seg, 11)), _numpy_token_mask(seg))
    no_seg = np.asarray(sl.token_mask(None, 6))
    np.testing.assert_array_equal(no_seg[0, 0], np.tril(np.ones((6, 6), bool)))


def test_segment_block_mask_is_exact_for_packed_rows():
    seg = np.array([[0] * 9 + [1] * 7 + [2] * 3 + [3] * 6 + [-1] * 4])
    bq, bk = 4, 4
    sp = sl.padded_length(seg.shape[1], bq, bk)
    expected = _blockify(_numpy_token_mask(seg), bq, bk, sp)
    np.testing.assert_array_equal(sl.segment_block_mask(seg, block_q=bq, block_k=bk), expected)
    # Shared-prefix rows skip blocks: fewer pairs than dense causal.
    assert expected.sum() < sl.causal_block_mask(seg.shape[1], block_q=bq, block_k=bk).sum()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-1, 3), min_size=1, max_size=20), st.sampled_from([(2, 2), (4, 2), (2, 4)]))
def test_segment_block_mask_covers_every_allowed_pair_for_any_layout(segs, blocks):
    seg = np.array([segs])
    bq, bk = blocks
    sp = sl.padded_length(seg.shape[1], bq, bk)
    needed = _blockify(_numpy_token_mask(seg), bq, bk, sp)
    got = np.asarray(sl.segment_block_mask(seg, block_q=bq, block_k=bk))
    assert not np.any(needed & ~got)


def test_streaming_block_mask_is_sink_plus_local_window():
    m = sl.streaming_block_mask(40, streaming_heads=[True, False], sink_blocks=2, local_blocks=3, block_q=4,
                                block_k=4)
    causal = sl.causal_block_mask(40, block_q=4, block_k=4)[0, 0]
    np.testing.assert_array_equal(m[0, 1], causal)
    for i in range(10):
        for j in range(10):
            assert m[0, 0, i, j] == (j <= i and (j < 2 or i - j < 3)), (i, j)
    # Per-query cost is bounded: at most sink + local blocks.
    assert m[0, 0].sum(-1).max() == 5
    with pytest.raises(ValueError, match="local_blocks"):
        sl.streaming_block_mask(8, streaming_heads=[True], sink_blocks=1, local_blocks=0, block_q=4, block_k=4)


def test_streaming_window_in_key_blocks_when_blocks_differ():
    # block_q = 8, block_k = 4: query block i ends in key block 2i + 1.
    m = sl.streaming_block_mask(32, streaming_heads=[True], sink_blocks=1, local_blocks=2, block_q=8, block_k=4)
    np.testing.assert_array_equal(np.nonzero(m[0, 0, 3])[0], [0, 6, 7])


def _check_schedule(schedule, mask):
    mask = np.asarray(mask)
    kv_index, kv_count = np.asarray(schedule.kv_index), np.asarray(schedule.kv_count)
    q_index, q_count = np.asarray(schedule.q_index), np.asarray(schedule.q_count)
    np.testing.assert_array_equal(kv_count, mask.sum(-1))
    np.testing.assert_array_equal(q_count, mask.sum(-2))
    for idx_arr, cnt_arr, m in ((kv_index, kv_count, mask), (q_index, q_count, np.swapaxes(mask, -1, -2))):
        for pos in np.ndindex(cnt_arr.shape):
            c = cnt_arr[pos]
            np.testing.assert_array_equal(idx_arr[pos][:c], np.nonzero(m[pos])[0])
            if c:  # padded steps repeat the last valid block (no new copy)
                assert np.all(idx_arr[pos][c:] == idx_arr[pos][c - 1])


def test_schedule_lists_every_block_once_in_order_and_transposes():
    seg = np.array([[0] * 6 + [1] * 6 + [2] * 6 + [-1] * 3, [0] * 10 + [1] * 4 + [2] * 5 + [-1] * 2])
    sched = sl.streaming_schedule(21, streaming_heads=[True, False], sink_blocks=1, local_blocks=1, block_q=8,
                                  block_k=4, segment_ids=seg)
    assert sched.kv_index.shape == (2, 2, 3, sched.num_kv_steps)
    assert sched.num_kv_steps == int(np.asarray(sched.block_mask).sum(-1).max())
    _check_schedule(sched, sched.block_mask)
    dense = sl.dense_causal_schedule(21, block_q=8, block_k=4)
    _check_schedule(dense, sl.causal_block_mask(21, block_q=8, block_k=4))
    assert dense.num_kv_steps == 6 and dense.num_q_steps == 3


def test_schedule_built_under_jit_matches_concrete():
    seg = np.array([[0] * 5 + [1] * 4 + [2] * 4 + [-1] * 3])
    concrete = sl.prefix_grouper_schedule(seg, block_q=4, block_k=4)
    traced = jax.jit(lambda s: sl.prefix_grouper_schedule(s, block_q=4, block_k=4))(jnp.asarray(seg))
    assert traced.num_kv_steps == 4  # nk under tracing
    _check_schedule(traced, concrete.block_mask)
    np.testing.assert_array_equal(np.asarray(traced.block_mask), concrete.block_mask)
    with pytest.raises(ValueError, match="max_kv_steps"):
        sl.prefix_grouper_schedule(seg, block_q=4, block_k=4, max_kv_steps=1)


def test_element_mask_is_token_rule_and_scheduled_blocks():
    sched = sl.streaming_schedule(12, streaming_heads=[True], sink_blocks=1, local_blocks=1, block_q=4, block_k=4)
    m = np.asarray(sl.element_mask(sched))[0, 0]
    for a in range(12):
        for c in range(12):
            assert m[a, c] == (c <= a and (c < 4 or c // 4 == a // 4)), (a, c)


# --------------------------------------------------------------------------- #
# Prefix Grouper packing
# --------------------------------------------------------------------------- #


def _python_pack(prompt, plen, comps, lens):
    tokens, seg, pos = list(prompt[:plen]), [0] * plen, list(range(plen))
    for i, (c, n) in enumerate(zip(comps, lens)):
        tokens += list(c[:n])
        seg += [i + 1] * n
        pos += list(range(plen, plen + n))
    pad = len(prompt) + comps.size - len(tokens)
    return tokens + [0] * pad, seg + [-1] * pad, pos + [0] * pad


_pack = jax.jit(sl.prefix_grouper_pack)
_naive = jax.jit(sl.naive_group_rows)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(0, 4), min_size=3, max_size=3), st.integers(0, 10 ** 6))
def test_pack_matches_python_construction_and_index_maps(plen, lens, seed):
    rng = np.random.default_rng(seed)
    lp, t, g = 6, 4, len(lens)
    lens = np.array(lens)
    prompt = rng.integers(1, 50, lp)
    comps = rng.integers(1, 50, (g, t))
    p = jax.tree.map(np.asarray, _pack(prompt, plen, comps, lens))
    tokens, seg, pos = _python_pack(prompt, plen, comps, lens)
    np.testing.assert_array_equal(p.tokens, tokens)
    np.testing.assert_array_equal(p.segment_ids, seg)
    np.testing.assert_array_equal(p.positions, pos)
    for i in range(g):
        for j in range(t):
            assert p.completion_mask[i, j] == (j < lens[i])
            if j < lens[i]:
                slot = p.token_index[i, j]
                assert p.tokens[slot] == comps[i, j] and p.positions[slot] == plen + j
                # The predicting slot: last prompt token, else the previous token.
                assert p.logit_index[i, j] == (plen - 1 if j == 0 else slot - 1)
    # Naive rows: the same completion tokens follow the same predicting tokens.
    n_tok, n_seg, n_pos, n_idx, n_mask = map(np.asarray, _naive(prompt, plen, comps, lens))
    np.testing.assert_array_equal(n_mask, p.completion_mask)
    for i in range(g):
        for j in range(lens[i]):
            assert n_tok[i, n_idx[i, j] + 1] == comps[i, j]
            assert n_pos[i, n_idx[i, j]] == p.positions[p.logit_index[i, j]]
            assert n_tok[i, n_idx[i, j]] == p.tokens[p.logit_index[i, j]]
        assert np.all(n_seg[i, : plen + lens[i]] == 0) and np.all(n_seg[i, plen + lens[i]:] == -1)


def test_unpack_gathers_and_zeroes_padding():
    p = sl.prefix_grouper_pack(np.array([3, 4, 5]), 3, np.array([[6, 7], [8, 0]]), np.array([2, 1]))
    values = jnp.arange(7.0)[:, None] * jnp.ones((1, 2))
    out = np.asarray(sl.prefix_grouper_unpack(values, p.logit_index, p.completion_mask))
    np.testing.assert_array_equal(out[..., 0], [[2.0, 3.0], [2.0, 0.0]])
    with pytest.raises(ValueError, match="completion_lens"):
        sl.prefix_grouper_pack(np.array([3, 4]), 2, np.array([[6, 7]]), np.array([2, 1]))


def test_pack_vmaps_over_prompts_and_schedules_per_row():
    prompts = np.array([[3, 4, 5, 0], [6, 7, 0, 0]])
    comps = np.array([[[8, 9], [10, 0]], [[11, 12], [13, 14]]])
    lens = np.array([[2, 1], [2, 2]])
    p = jax.vmap(sl.prefix_grouper_pack)(prompts, np.array([3, 2]), comps, lens)
    np.testing.assert_array_equal(p.segment_ids, [[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 1, 1, 2, 2, -1, -1]])
    np.testing.assert_array_equal(p.positions[1], [0, 1, 2, 3, 2, 3, 0, 0])
    sched = sl.prefix_grouper_schedule(np.asarray(p.segment_ids), block_q=2, block_k=2)
    assert sched.kv_index.shape[:2] == (2, 1)
    _check_schedule(sched, sl.segment_block_mask(np.asarray(p.segment_ids), block_q=2, block_k=2))
