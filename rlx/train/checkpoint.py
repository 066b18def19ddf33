"""Checkpoints: the full training state plus the data iterator's state, via orbax.

Layout: ``<run_dir>/checkpoints/<step>/{state, data, extra}``. ``state`` is the
``TrainState`` pytree (and any other array pytrees, e.g. a critic's state),
``data`` is the JSON state of the data iterator (grain's ``get_state()``), so a
restarted run continues with the same prompts. Saves are asynchronous; orbax
writes into a temporary directory and renames it when complete, so a run killed
mid-save leaves no half-written step behind (the temporary directory is ignored and
cleaned up). A step that exists but cannot be read (corrupted files) is reported,
moved aside to ``<step>.corrupt``, and the previous good step is used.

Silent corruption (a flipped bit inside an uncompressed array chunk reads back
without any error) is caught by a digest: every save stores, in ``extra``, a uint32
fingerprint per state leaf (``state_digest``), and a restore recomputes it and
treats a mismatch like an unreadable step.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("rlx.checkpoint")

DIGEST_KEY = "rlx_state_digest"   # reserved key in a checkpoint's ``extra``


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The bits of every element as uint32, flattened (wider dtypes give 2 words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.reshape(-1).astype(jnp.uint32)
    width = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


@jax.jit
def _digests(leaves: list) -> jax.Array:
    out = []
    for x in leaves:
        u = _leaf_bits(x)
        i = jnp.arange(u.shape[0], dtype=jnp.uint32)
        out.append(jnp.sum((u + jnp.uint32(0x9E3779B9)) * (2 * i + 1), dtype=jnp.uint32))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def state_digest(tree: Any) -> list[int]:
    """One uint32 per array leaf: Σ_i (u_i + c)·(2i + 1) mod 2³², u_i the element bits.

    Changing any single element changes its leaf's digest (2i + 1 is odd, hence
    invertible mod 2³²), and integer sums are exact, so the value does not depend on
    the sharding or the reduction order (identical on every host and mesh).
    """
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x)
              for x in jax.tree.leaves(tree)]
    out = _digests(leaves)
    if not out.is_fully_addressable:
        out = multihost_utils.process_allgather(out, tiled=True)
    return [int(v) for v in np.asarray(out)]


def _dtypes(tree: Any) -> list[str]:
    return [str(jnp.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype)
            for x in jax.tree.leaves(tree)]


class Checkpointer:
    """Saves every ``every_steps`` steps and/or ``every_minutes`` minutes, keeps ``keep``."""

    def __init__(self, directory: str, *, every_steps: int | None = 50,
                 every_minutes: float | None = None, keep: int = 3,
                 async_save: bool = True):
        if every_steps is not None and every_steps <= 0:
            raise ValueError(f"checkpoint every_steps={every_steps} must be positive")
        self.directory = os.path.abspath(directory)
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self._last_time = time.monotonic()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True))
        self.corrupt_steps: list[int] = []

    # ------------------------------------------------------------------ saving
    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        if self.every_minutes is not None:
            return time.monotonic() - self._last_time >= 60 * self.every_minutes
        return False

    def save(self, step: int, state: Any, data_state: dict | None = None,
             extra: dict | None = None) -> None:
        """Starts an (asynchronous) save of ``state`` at ``step``."""
        if step in self._manager.all_steps():
            return
        extra = {**(extra or {}),
                 DIGEST_KEY: {"digest": state_digest(state), "dtypes": _dtypes(state)}}
        args = {"state": ocp.args.StandardSave(state),
                "data": ocp.args.JsonSave(data_state or {}),
                "extra": ocp.args.JsonSave(extra)}
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        self._last_time = time.monotonic()

    def maybe_save(self, step: int, state: Any, data_state: dict | None = None,
                   extra: dict | None = None) -> bool:
        if self.due(step):
            self.save(step, state, data_state, extra)
            return True
        return False

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # --------------------------------------------------------------- restoring
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps(read=True))

    def restore_latest(self, abstract_state: Any
                       ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, extra) of the newest readable checkpoint, or None.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings) that
        says how to lay the arrays out. Unreadable steps, and steps whose restored
        arrays do not match the digest recorded at save time, are moved aside and
        skipped. (The digest is checked when the restored leaves have the saved dtypes.)
        """
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(), extra=ocp.args.JsonRestore()))
                jax.block_until_ready(restored.state)
                extra = dict(restored.extra or {})
                _verify(restored.state, extra.pop(DIGEST_KEY, None))
                return step, restored.state, dict(restored.data or {}), extra
            except Exception as err:  # noqa: BLE001 - any read failure means "corrupt"
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); "
                            "falling back to the previous one", step, self.directory,
                            type(err).__name__, str(err)[:300])
                self.corrupt_steps.append(step)
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        path = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.isdir(path):
            target = path + ".corrupt"
            if os.path.exists(target):
                shutil.rmtree(target)
            os.rename(path, target)
        self._manager.reload()


def _verify(state: Any, record: dict | None) -> None:
    """Raises ValueError when ``state`` does not match the digest saved with it."""
    if not record or _dtypes(state) != list(record.get("dtypes", [])):
        return
    got, want = state_digest(state), list(record["digest"])
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    if bad or len(got) != len(want):
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
        raise ValueError("restored arrays differ from the saved digest at "
                         f"{[paths[i] for i in bad[:5]]}{' …' if len(bad) > 5 else ''}")


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with shardings, if given) describing ``tree``."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
