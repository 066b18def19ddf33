"""Named batch pytrees consumed by the jitted steps.

Shapes: B rows, S full sequence length (prompt + completion), T completion length,
Sp = S − T prompt length (prompts left-padded so completions start at index Sp).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rlx.objectives.types import PolicyBatch


@struct.dataclass
class Sequences:
    """tokens [B,S] int32, attention_mask [B,S] bool, positions [B,S] int32."""

    tokens: jax.Array
    attention_mask: jax.Array
    positions: jax.Array


def make_sequences(tokens, attention_mask) -> Sequences:
    """Positions count real tokens (left or right padding)."""
    mask = jnp.asarray(attention_mask).astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return Sequences(tokens=jnp.asarray(tokens, jnp.int32), attention_mask=mask,
                     positions=positions)


@struct.dataclass
class RolloutBatch:
    """A policy/value update batch: sequences [B,S] plus per-completion-token arrays."""

    seq: Sequences
    policy: PolicyBatch

    @property
    def completion_length(self) -> int:
        return self.policy.mask.shape[1]


@struct.dataclass
class SFTBatch:
    """Next-token training: loss_mask[b, t] = 1 where token t is a target (response
    token), so the loss is −log π(tokens_t | tokens_<t) averaged over those tokens."""

    seq: Sequences
    loss_mask: jax.Array


@struct.dataclass
class PairBatch:
    """Preference pairs: chosen and rejected sequences sharing a prompt.

    ``*_mask`` [B,S] select response tokens (targets) of each sequence; ``ref_*``
    [B] are the reference policy's summed response log-probs (DPO family) or zeros.
    """

    chosen: Sequences
    rejected: Sequences
    chosen_mask: jax.Array
    rejected_mask: jax.Array
    ref_chosen_logp: jax.Array
    ref_rejected_logp: jax.Array


@struct.dataclass
class PackedRolloutBatch:
    """Policy batch in the shared-prefix layout (``rlx.train.packing``).

    ``packed`` holds one row per prompt; ``grouped_policy`` holds the PolicyBatch with
    rows regrouped as [P, G, ...] so micro-batches and devices split whole groups.
    """

    packed: "PackedSequences"  # noqa: F821 - rlx.train.packing.PackedSequences
    grouped_policy: PolicyBatch

    @classmethod
    def create(cls, packed, policy: PolicyBatch) -> "PackedRolloutBatch":
        p, g = packed.token_index.shape[:2]
        regroup = lambda x: None if x is None else x.reshape(p, g, *x.shape[1:])  # noqa: E731
        return cls(packed=packed, grouped_policy=jax.tree.map(regroup, policy))

    @property
    def policy(self) -> PolicyBatch:
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), self.grouped_policy)

    @property
    def completion_length(self) -> int:
        return self.packed.token_index.shape[2]
