"""Batched in-graph sampling: group rollouts with a shared-prefix KV cache."""

from rlx.sampling.buckets import (DEFAULT_COMPLETION_BUCKETS, DEFAULT_PROMPT_BUCKETS,
                                  bucket_length)
from rlx.sampling.config import SamplerConfig
from rlx.sampling.controls import (min_p_mask, process_logits, sample, top_k_mask,
                                   top_p_mask)
from rlx.sampling.generate import (DecodeState, PreparedBatch, decode, device_inputs,
                                   generate, prefill, prepare)
from rlx.sampling.rollout import Rollout

__all__ = [
    "DEFAULT_COMPLETION_BUCKETS", "DEFAULT_PROMPT_BUCKETS", "DecodeState", "PreparedBatch",
    "Rollout", "SamplerConfig", "bucket_length", "decode", "device_inputs", "generate",
    "min_p_mask", "prefill", "prepare", "process_logits", "sample", "top_k_mask",
    "top_p_mask",
]
