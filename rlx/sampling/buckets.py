"""Length buckets: the sampler compiles once per (prompt bucket, completion bucket).

A batch's longest prompt is rounded up to the smallest prompt bucket that holds it
(prompts are left-padded to that length) and ``max_new_tokens`` to the smallest
completion bucket (the completion buffers and KV slots have that length; the decode
loop still stops at ``max_new_tokens``). The defaults are powers of two, so padding
wastes at most half a bucket and a run compiles at most ⌈log2⌉ shapes per axis:

  prompt buckets:     16, 32, 64, …, 8192
  completion buckets: 16, 32, 64, …, 16384

Prompts longer than the largest prompt bucket raise a ``ValueError`` unless the sampler
is configured with ``overlong_prompt="truncate_left"``, which keeps each prompt's last
``max(prompt_buckets)`` tokens (the context nearest the completion) and drops the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_PROMPT_BUCKETS: tuple[int, ...] = tuple(2 ** i for i in range(4, 14))
DEFAULT_COMPLETION_BUCKETS: tuple[int, ...] = tuple(2 ** i for i in range(4, 15))


def check_buckets(name: str, buckets: Sequence[int]) -> tuple[int, ...]:
    """Validates a bucket list: non-empty, positive, strictly increasing integers."""
    buckets = tuple(buckets)
    if not buckets or any(not isinstance(b, (int, np.integer)) or b <= 0 for b in buckets):
        raise ValueError(f"{name}={buckets!r}: must be a non-empty sequence of positive ints")
    if any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise ValueError(f"{name}={buckets!r}: must be strictly increasing")
    return tuple(int(b) for b in buckets)


def bucket_length(length: int, buckets: Sequence[int], *, name: str = "length") -> int:
    """The smallest bucket ≥ ``length``; ValueError if ``length`` exceeds every bucket."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"{name}={length} exceeds the largest bucket {max(buckets)} "
                     f"(buckets {tuple(buckets)})")


def left_pad(prompts: np.ndarray, mask: np.ndarray, length: int, pad_id: int, *,
             truncate: bool) -> tuple[np.ndarray, np.ndarray]:
    """Re-lays rows of (ids [P, S], mask [P, S]) as left-padded [P, length] arrays.

    The real tokens of a row (mask == 1, in order, wherever the padding was) end at the
    last column. Rows with more than ``length`` real tokens raise unless ``truncate``,
    which keeps their last ``length`` tokens.
    """
    prompts = np.asarray(prompts)
    mask = np.asarray(mask).astype(bool)
    out = np.full((prompts.shape[0], length), pad_id, np.int32)
    out_mask = np.zeros((prompts.shape[0], length), bool)
    for i in range(prompts.shape[0]):
        row = prompts[i][mask[i]]
        if row.size > length:
            if not truncate:
                raise ValueError(f"prompt {i} has {row.size} tokens, more than the "
                                 f"largest prompt bucket {length}")
            row = row[-length:]
        if row.size:
            out[i, length - row.size:] = row
            out_mask[i, length - row.size:] = True
    return out, out_mask
