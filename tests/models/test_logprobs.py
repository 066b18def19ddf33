"""Chunked log-prob/entropy path, and that forcing the Pallas kernel gives the same."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.models.logprobs import logprobs_from_hidden
from rlx_kernels import dispatch


def _inputs(b=2, s=7, d=8, v=50, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (b, s, d)), jax.random.normal(k2, (d, v)),
            jax.random.randint(k3, (b, s), 0, v))


def _dense(h, w, y, temperature=1.0):
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp)
    return (np.take_along_axis(logp, np.asarray(y)[..., None], -1)[..., 0],
            -(p * logp).sum(-1))


@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_chunked_logprobs_match_dense_float64(chunk):
    h, w, y = _inputs()
    logp, ent = logprobs_from_hidden(h, w, y, chunk_size=chunk, temperature=0.7)
    ref_lp, ref_ent = _dense(h, w, y, temperature=0.7)
    np.testing.assert_allclose(logp, ref_lp, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=3e-5)


def test_forcing_the_kernel_backend_matches_the_chunked_path_with_gradients():
    h, w, y = _inputs()

    def loss(h, w, backend):
        lp, ent = logprobs_from_hidden(h, w, y, chunk_size=3, backend=backend)
        return jnp.sum(lp) + 0.1 * jnp.sum(ent)

    ref = jax.value_and_grad(loss, argnums=(0, 1))(h, w, "reference")
    with dispatch.force_backend("tpu"):
        got = jax.value_and_grad(loss, argnums=(0, 1))(h, w, "auto")
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(got[1], ref[1]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_mismatched_targets_are_named():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="targets shape"):
        logprobs_from_hidden(h, w, y[:, :3])
