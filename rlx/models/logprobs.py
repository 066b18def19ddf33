"""Per-token log-probabilities and entropies from hidden states, chunked over tokens.

log p(y_t) = z_{t,y_t} − logsumexp(z_t),  H_t = logsumexp(z_t) − Σ_v p_v z_{t,v},
with logits z_t = h_t · W / τ. Only one [B, C, V] chunk of logits exists at a time
(C = ``chunk_size`` tokens), so the full [B, S, V] float32 log-softmax is never built.

``backend`` goes to the kernel dispatcher (``rlx_kernels.dispatch``): on TPU / NVIDIA
GPU ("auto") the fused Pallas kernel ``token_logprob_entropy_from_hidden`` also
streams over the vocabulary, so not even a [B, C, V] chunk exists; elsewhere (CPU) the
chunked jnp path below runs. Both give the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_stats(h, w, y, temperature):
    z = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32) / temperature
    z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))  # shift: less cancellation
    lse = jnp.log(jnp.sum(jnp.exp(z), axis=-1))
    target = jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    p = jnp.exp(z - lse[..., None])
    entropy = lse - jnp.sum(p * z, axis=-1)
    return target - lse, entropy


def logprobs_from_hidden(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, *,
                         temperature: float = 1.0, chunk_size: int = 512,
                         backend: str = "auto") -> tuple[jax.Array, jax.Array]:
    """hidden [B,S,D], unembedding [D,V], targets [B,S] -> (logp [B,S], entropy [B,S]) f32."""
    b, s, d = hidden.shape
    if targets.shape != (b, s):
        raise ValueError(f"targets shape {targets.shape} != hidden's [B, S] = {(b, s)}")
    if unembedding.shape[0] != d:
        raise ValueError(f"unembedding shape {unembedding.shape} does not match D={d}")
    from rlx_kernels import dispatch
    if dispatch.resolve_backend(backend).is_kernel:
        from rlx_kernels.logprob_entropy import token_logprob_entropy_from_hidden
        return token_logprob_entropy_from_hidden(hidden, unembedding, targets,
                                                 temperature=temperature, backend=backend)
    c = min(chunk_size, s)
    n = -(-s // c)
    pad = n * c - s
    hp = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    yp = jnp.pad(targets, ((0, 0), (0, pad)))
    hc = hp.reshape(b, n, c, d).transpose(1, 0, 2, 3)
    yc = yp.reshape(b, n, c).transpose(1, 0, 2)
    if n == 1:
        logp, ent = _chunk_stats(hc[0], unembedding, yc[0], temperature)
        return logp[:, :s], ent[:, :s]
    stats = jax.checkpoint(lambda h, y: _chunk_stats(h, unembedding, y, temperature))
    logp, ent = jax.lax.map(lambda xs: stats(*xs), (hc, yc))
    logp = logp.transpose(1, 0, 2).reshape(b, n * c)[:, :s]
    ent = ent.transpose(1, 0, 2).reshape(b, n * c)[:, :s]
    return logp, ent
