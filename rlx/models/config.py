"""Model configuration and named presets for the Llama-3 / Qwen2 decoder family.

One frozen dataclass describes every supported checkpoint shape. The fields follow
Hugging Face ``config.json`` names where one exists so that import/export is a
plain mapping (see ``rlx/models/convert.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type="llama3"``).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor``
    are divided by ``factor``; those shorter than ``.../high_freq_factor`` are kept;
    the band in between is interpolated smoothly (Llama 3 report, arXiv 2407.21783).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    Attributes:
      vocab_size: V.
      hidden_size: D.
      intermediate_size: width of the SwiGLU MLP.
      num_layers: L.
      num_heads: H query heads.
      num_kv_heads: K key/value heads (grouped-query attention, H % K == 0).
      head_dim: per-head width (default D // H).
      rope_theta: RoPE base.
      rope_scaling: optional Llama-3 scaling.
      rms_norm_eps: RMSNorm epsilon.
      qkv_bias: bias on the q/k/v projections (Qwen2).
      tie_embeddings: unembed with the transposed input embedding.
      max_position_embeddings: longest position the rotary table is built for.
      param_dtype: dtype parameters are stored in (master weights).
      dtype: compute dtype of matmuls (activations); softmax and norms use float32.
      attention_backend: "reference" (jnp masked attention), "dense_kernel" (the
        Pallas flash kernel over all causal blocks) or "block_sparse" (the same kernel
        driven by a block schedule: Prefix Grouper segments skip cross-completion
        blocks, and ``streaming_heads`` use LServe's sink + local-window Λ pattern).
        Kernel paths go through ``rlx_kernels.dispatch`` (reference on CPU).
      attention_block: query/key block size of the kernel paths.
      streaming_heads: query-head indices that attend only to the first
        ``streaming_sink_blocks`` blocks and the last ``streaming_local_blocks`` blocks
        (every layer; "block_sparse" backend only — the other backends are dense).
      decode_page_size: 0 (default) for dense decode; > 0 turns on LServe's
        query-aware KV-page selection (arXiv 2502.14866) for single-token cache steps:
        the cache is viewed as pages of this many slots and each step attends only to
        the selected pages (``rlx.models.paged_attention``). Prefill stays dense.
      decode_page_budget: pages chosen by score per (row, query head) on top of the
        sink and local pages. Default 62: with 1 sink + 1 local page, 64 pages, as
        LServe's 4096-token budget at 64-token pages.
      decode_sink_pages: first non-empty pages always attended (the prompt's start).
      decode_local_pages: pages ending at the newest token always attended.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_backend: str = "reference"
    attention_block: int = 128
    streaming_heads: tuple[int, ...] = ()
    streaming_sink_blocks: int = 1
    streaming_local_blocks: int = 4
    decode_page_size: int = 0
    decode_page_budget: int = 62
    decode_sink_pages: int = 1
    decode_local_pages: int = 1

    def __post_init__(self):
        def bad(field, value, why):
            raise ValueError(f"ModelConfig.{field}={value!r}: {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(name, value, "must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", self.num_kv_heads,
                f"must divide num_heads={self.num_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                bad("head_dim", None, "hidden_size must be divisible by num_heads "
                    "when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            bad("head_dim", self.head_dim, "must be even for rotary embeddings")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                bad(name, getattr(self, name), f"must be one of {DTYPES}")
        if self.attention_backend not in ("reference", "dense_kernel", "block_sparse"):
            bad("attention_backend", self.attention_backend,
                "must be 'reference', 'dense_kernel' or 'block_sparse'")
        object.__setattr__(self, "streaming_heads", tuple(int(h) for h in self.streaming_heads))
        if any(not 0 <= h < self.num_heads for h in self.streaming_heads):
            bad("streaming_heads", self.streaming_heads,
                f"head indices must be in [0, {self.num_heads})")
        if self.attention_block <= 0:
            bad("attention_block", self.attention_block, "must be positive")
        for name in ("decode_page_size", "decode_page_budget", "decode_sink_pages",
                     "decode_local_pages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(name, value, "must be a non-negative integer")
        if self.decode_page_size and (self.decode_page_budget + self.decode_sink_pages
                                      + self.decode_local_pages) == 0:
            bad("decode_page_budget", self.decode_page_budget,
                "page selection needs decode_page_budget + decode_sink_pages + "
                "decode_local_pages >= 1")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def num_params(self) -> int:
        """Parameter count of the policy (no value head)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        embed = v * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_QWEN25 = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, qkv_bias=True,
               max_position_embeddings=32768)
_LLAMA3 = dict(rope_theta=500_000.0, rms_norm_eps=1e-5, qkv_bias=False,
               max_position_embeddings=131072)

PRESETS: dict[str, ModelConfig] = {
    # A few hundred thousand parameters: tests and the CPU demo.
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=192,
                        num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=10000.0,
                        tie_embeddings=True, max_position_embeddings=1024),
    # The default experiment's model: still CPU-trainable in minutes.
    "small": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384,
                         num_layers=4, num_heads=4, num_kv_heads=2, rope_theta=10000.0,
                         tie_embeddings=True, max_position_embeddings=1024),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2,
                                tie_embeddings=True, **_QWEN25),
    "qwen2.5-1.5b": ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_layers=28, num_heads=12, num_kv_heads=2,
                                tie_embeddings=True, **_QWEN25),
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4,
                              tie_embeddings=False, **_QWEN25),
    "llama3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                               num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                               tie_embeddings=True,
                               rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0,
                                                        original_max_position_embeddings=8192),
                               **_LLAMA3),
    "llama3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_layers=32, num_heads=32, num_kv_heads=8,
                               tie_embeddings=False,
                               rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0,
                                                        original_max_position_embeddings=8192),
                               **_LLAMA3),
}


@gin.configurable
def model_config(preset: str = "tiny", **overrides: Any) -> ModelConfig:
    """Returns a named preset, optionally with fields overridden.

    >>> model_config("qwen2.5-0.5b", dtype="bfloat16").dtype
    'bfloat16'
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)} "
                             f"for preset {preset!r}")
        return PRESETS[preset].replace(**overrides)
    return PRESETS[preset]
