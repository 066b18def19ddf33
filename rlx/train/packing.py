"""Shared-prefix (Prefix Grouper, arXiv 2506.05433) layout for update passes.

The naive layout scores G rows ``[prompt | c_i]`` per prompt, encoding the prompt G
times. The packed layout scores one row ``[prompt | c_1 | … | c_G]`` per prompt: each
completion attends to the prompt and causally to itself (segment ids), restarts its
positions at the prompt length, and completion token t of c_i is predicted from packed
slot ``logit_index`` (the last prompt slot for t = 0). Log-probs, entropies and their
gradients equal the naive layout's; the prompt is encoded once. With the
"block_sparse" attention backend the kernel also skips the cross-completion blocks.

Shapes: P prompts, G group, B = P·G rows, Sp prompt bucket, T completion bucket,
S = Sp + G·T packed length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rlx.models import api
from rlx.models.logprobs import logprobs_from_hidden
from rlx.objectives.types import TokenOutputs
from rlx_kernels.attention_schedules import prefix_grouper_pack


@struct.dataclass
class PackedSequences:
    """tokens / segment_ids / positions [P, S]; token_index / logit_index [P, G, T]."""

    tokens: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    token_index: jax.Array
    logit_index: jax.Array

    @property
    def group_size(self) -> int:
        return self.token_index.shape[1]

    @property
    def completion_length(self) -> int:
        return self.token_index.shape[2]


def pack_groups(prompt_ids, prompt_mask, completion_ids, completion_mask, group_size: int,
                *, pad_id: int = 0) -> PackedSequences:
    """Packs rollouts (rows b = p·G + g; prompts left-padded [B, Sp], completions [B, T]
    valid on their first ``sum(completion_mask)`` tokens) into one row per prompt."""
    b, sp = prompt_ids.shape
    if b % group_size:
        raise ValueError(f"rows {b} not divisible by group size {group_size}")
    p = b // group_size
    first = jnp.arange(p) * group_size
    pmask = jnp.asarray(prompt_mask, bool)[first]
    plen = jnp.sum(pmask, axis=1).astype(jnp.int32)
    # left-padded -> right-padded: slot j holds prompt token j.
    src = (jnp.arange(sp)[None, :] + (sp - plen)[:, None]) % sp
    prompts = jnp.take_along_axis(jnp.asarray(prompt_ids)[first], src, axis=1)
    comps = jnp.asarray(completion_ids).reshape(p, group_size, -1)
    lens = jnp.sum(jnp.asarray(completion_mask, jnp.int32), axis=1).reshape(p, group_size)
    packed = jax.vmap(lambda a, n, c, l: prefix_grouper_pack(a, n, c, l, pad_id=pad_id))(
        prompts, plen, comps, lens)
    return PackedSequences(tokens=packed.tokens, segment_ids=packed.segment_ids,
                           positions=packed.positions, token_index=packed.token_index,
                           logit_index=packed.logit_index)


def pack_rollout(rollout, group_size: int, *, pad_id: int = 0) -> PackedSequences:
    return pack_groups(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                       rollout.completion_mask, group_size, pad_id=pad_id)


def packed_completion_outputs(graphdef, params, packed: PackedSequences, *,
                              temperature: float = 1.0, chunk_size: int = 512) -> TokenOutputs:
    """Per-completion-token log-probs and entropies [B, T] from the packed rows."""
    model = api.merge(graphdef, params)
    valid = packed.segment_ids >= 0
    hidden, _ = model(packed.tokens, packed.positions, valid, segment_ids=packed.segment_ids)
    p, g, t = packed.token_index.shape
    d = hidden.shape[-1]
    h = jnp.take_along_axis(hidden, packed.logit_index.reshape(p, g * t)[..., None], axis=1)
    targets = jnp.take_along_axis(packed.tokens, packed.token_index.reshape(p, g * t), axis=1)
    logp, ent = logprobs_from_hidden(h.reshape(p, g * t, d), model.unembedding(), targets,
                                     temperature=temperature, chunk_size=chunk_size)
    return TokenOutputs(logp=logp.reshape(p * g, t), entropy=ent.reshape(p * g, t))


def packed_completion_values(graphdef, params, packed: PackedSequences) -> jax.Array:
    """Critic values V(s) before each completion token, [B, T], from the packed rows."""
    return _values(graphdef, params, packed)


def _values(graphdef, params, packed):
    model = api.merge(graphdef, params)
    hidden, _ = model.trunk(packed.tokens, packed.positions, packed.segment_ids >= 0,
                            segment_ids=packed.segment_ids)
    v = model.head(hidden.astype(jnp.float32))[..., 0]
    p, g, t = packed.logit_index.shape
    return jnp.take_along_axis(v, packed.logit_index.reshape(p, g * t), axis=1).reshape(p * g, t)
