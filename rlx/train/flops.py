"""Model-FLOP accounting for throughput metrics (MFU)."""

from __future__ import annotations

import jax

# Peak dense bf16 FLOP/s by device kind (vendor figures, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5 lite": 197e12,
             "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12, "TPU v6": 918e12}


def peak_flops(device=None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (default: the first device), None if unknown (CPU)."""
    kind = getattr(device or jax.devices()[0], "device_kind", "")
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


def train_flops(config, rows: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one pass over [rows, seq_len] tokens:
    6·N·tokens for the dense weights plus 12·L·S²·H·Dh/2 per row for causal attention
    (Kaplan et al. 2020 / PaLM appendix B accounting)."""
    dense = 6.0 * config.num_params * rows * seq_len
    attention = 12.0 * config.num_layers * rows * seq_len ** 2 * config.num_heads * \
        config.head_dim / 2
    return dense + attention
