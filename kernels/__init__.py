"""rlx's Pallas kernels, installed as the ``rlx_kernels`` package.

Each kernel module holds a public wrapper with shape checks, the Pallas
kernel(s), a custom VJP where training needs gradients, and a pure-jnp
``reference`` implementation; a dispatcher picks the backend.

- ``rlx_kernels.dispatch``: backend selection ("auto" | "tpu" | "gpu" |
  "reference"; ``force_backend`` context, ``set_backend``, env var
  ``RLX_KERNEL_BACKEND``; interpret mode when a kernel is forced off its platform).
- ``rlx_kernels.logprob_entropy``: per-token log p(target) and entropy from
  logits or from (hidden, unembedding), streamed over vocabulary chunks.
- ``rlx_kernels.ratio_stats``: one-pass importance-ratio statistics
  (``RatioStats``) and the differentiable ``ratio_variance`` of R²VPO.

Submodules are imported explicitly (``from rlx_kernels import ratio_stats``);
importing the package itself has no side effects.
"""
