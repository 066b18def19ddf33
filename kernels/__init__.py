"""rlx's Pallas kernels, installed as the ``rlx_kernels`` package.

Each kernel module holds a public wrapper with shape checks, the Pallas
kernel(s), a custom VJP where training needs gradients, and a pure-jnp
``reference`` implementation; a dispatcher picks the backend.
"""
