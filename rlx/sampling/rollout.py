"""``Rollout``: the pytree ``generate`` returns (B = P·G rows, row b = p·G + g)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Rollout:
    """Group rollouts. Shapes: B rows, Sp prompt bucket, T completion bucket.

    Attributes:
      prompt_ids: [B, Sp] int32, left-padded (row b holds prompt b // G).
      prompt_mask: [B, Sp] bool, True on real prompt tokens.
      completion_ids: [B, T] int32; ``pad_id`` after the end of the row.
      completion_mask: [B, T] bool, True on the first ``lengths[b]`` tokens. A stop
        token is part of the completion (masked in); tokens after it are masked out.
      sampling_logprobs: [B, T] f32 log-prob of each token under the distribution it
        was drawn from (after forbidden ids, temperature and truncation); 0 for greedy
        tokens and forced tokens (point masses) and on masked slots.
      policy_logprobs: [B, T] f32 log π(y_t | ·) of the untruncated policy at
        temperature 1 (forced tokens included), 0 on masked slots; None unless requested.
      lengths: [B] int32 completion lengths (stop token and forced tokens included).
      finished: [B] bool, the row ended with a sampled stop token.
      truncated: [B] bool, the row reached ``max_new_tokens`` without a stop token.
      group_id: [B] int32 prompt index p of the row within the batch.
      forced: [B, T] bool, True on forced-prefix tokens (fed, not sampled; the loss
        should mask them).
      decode_steps: [] int32 number of tokens the decode loop produced per row
        (≤ max_new_tokens; smaller when every row stopped early).
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    completion_ids: jax.Array
    completion_mask: jax.Array
    sampling_logprobs: jax.Array
    policy_logprobs: jax.Array | None
    lengths: jax.Array
    finished: jax.Array
    truncated: jax.Array
    group_id: jax.Array
    forced: jax.Array
    decode_steps: jax.Array

    @property
    def loss_mask(self) -> jax.Array:
        """[B, T] bool: completion tokens that were sampled (not forced)."""
        return self.completion_mask & ~self.forced

    def sequences(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(tokens [B, Sp+T], attention_mask [B, Sp+T], positions [B, Sp+T]) of prompt
        followed by completion, for teacher-forced forwards of the policy / reference.
        Positions count the real tokens before each token (left padding skipped)."""
        tokens = jnp.concatenate([self.prompt_ids, self.completion_ids], axis=1)
        mask = jnp.concatenate([self.prompt_mask, self.completion_mask], axis=1)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        return tokens, mask, positions
