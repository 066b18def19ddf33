"""Length buckets and left padding."""

import numpy as np
import pytest

from rlx.sampling.buckets import (DEFAULT_COMPLETION_BUCKETS, DEFAULT_PROMPT_BUCKETS,
                                  bucket_length, check_buckets, left_pad)


def test_lengths_round_up_to_the_smallest_holding_bucket():
    assert bucket_length(1, DEFAULT_PROMPT_BUCKETS) == 16
    assert bucket_length(16, DEFAULT_PROMPT_BUCKETS) == 16
    assert bucket_length(17, DEFAULT_PROMPT_BUCKETS) == 32
    assert bucket_length(300, DEFAULT_COMPLETION_BUCKETS) == 512
    assert DEFAULT_PROMPT_BUCKETS[-1] == 8192 and DEFAULT_COMPLETION_BUCKETS[-1] == 16384


def test_a_length_beyond_the_largest_bucket_raises():
    with pytest.raises(ValueError, match="exceeds the largest bucket 8"):
        bucket_length(9, (4, 8), name="prompt length")


def test_bucket_lists_must_be_positive_and_increasing():
    with pytest.raises(ValueError, match="strictly increasing"):
        check_buckets("b", (4, 4))
    with pytest.raises(ValueError, match="positive"):
        check_buckets("b", ())


def test_left_pad_moves_real_tokens_to_the_end_whatever_the_padding_side():
    ids = np.array([[5, 6, 0, 0], [0, 7, 8, 9]])
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1]])
    out, out_mask = left_pad(ids, mask, 6, pad_id=1, truncate=False)
    np.testing.assert_array_equal(out, [[1, 1, 1, 1, 5, 6], [1, 1, 1, 7, 8, 9]])
    np.testing.assert_array_equal(out_mask, [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])


def test_overlong_rows_raise_or_keep_their_last_tokens():
    ids = np.array([[1, 2, 3, 4, 5]])
    mask = np.ones_like(ids)
    with pytest.raises(ValueError, match="prompt 0 has 5 tokens"):
        left_pad(ids, mask, 3, pad_id=0, truncate=False)
    out, out_mask = left_pad(ids, mask, 3, pad_id=0, truncate=True)
    np.testing.assert_array_equal(out, [[3, 4, 5]])
    assert out_mask.all()
