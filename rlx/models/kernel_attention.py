"""The model's kernel attention backends ("dense_kernel", "block_sparse").

Bridges the model's masks to ``rlx_kernels.block_sparse_attention``: padding becomes
segment −1, unpacked rows are segment 0 and Prefix Grouper rows keep their segments,
so the kernel's rule (causal in packed order; a key is visible if its segment is 0 or
the query's) is exactly ``rlx.models.attention.allowed_mask``. Outputs at padding
queries are 0 here (arbitrary in the reference path); they are masked downstream.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlx_kernels import attention_schedules as schedules
from rlx_kernels.block_sparse_attention import block_sparse_attention


def attend(cfg, q, k, v, context):
    """q [B,S,H,Dh], k/v [B,S,K,Dh] -> [B,S,H,Dh] with the configured kernel path."""
    valid = context["key_valid"]
    seg = context.get("segment_ids")
    seg = jnp.zeros(valid.shape, jnp.int32) if seg is None else seg.astype(jnp.int32)
    segment_ids = jnp.where(valid, seg, -1)
    s, blk = q.shape[1], cfg.attention_block
    if cfg.attention_backend == "block_sparse" and cfg.streaming_heads:
        schedule = schedules.streaming_schedule(
            s, streaming_heads=[h in cfg.streaming_heads for h in range(cfg.num_heads)],
            sink_blocks=cfg.streaming_sink_blocks,
            local_blocks=cfg.streaming_local_blocks, block_q=blk, block_k=blk,
            segment_ids=segment_ids)
    elif cfg.attention_backend == "block_sparse":
        schedule = schedules.prefix_grouper_schedule(segment_ids, block_q=blk, block_k=blk)
    else:
        schedule = schedules.dense_causal_schedule(s, block_q=blk, block_k=blk)
    return block_sparse_attention(q, k, v, schedule, segment_ids=segment_ids)
