"""The training state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """step: scalar int32; params: nnx.State (f32 master weights); opt_state: optax
    state; key: PRNG key (new key per step via fold_in); objective_state: the
    objective's own state (R²VPO dual variable, adaptive KL coefficient, BNPO Beta
    parameters, ...) or None."""

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array
    objective_state: Any = None


def create(params, tx: optax.GradientTransformation, *, seed: int = 0,
           objective_state: Any = None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), key=jax.random.key_data(jax.random.key(seed)),
                      objective_state=objective_state)


def step_key(state: TrainState) -> jax.Array:
    """A fresh typed PRNG key for this step (the state stores raw key data so it
    checkpoints as a plain uint32 array)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
