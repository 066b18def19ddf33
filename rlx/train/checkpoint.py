"""Checkpoints: the full training state plus the data iterator's state, via orbax.

Layout: ``<run_dir>/checkpoints/<step>/{state, data, extra}``. ``state`` is the
``TrainState`` pytree (and any other array pytrees, e.g. a critic's state),
``data`` is the JSON state of the data iterator (grain's ``get_state()``), so a
restarted run continues with the same prompts. Saves are asynchronous; orbax
writes into a temporary directory and renames it when complete, so a run killed
mid-save leaves no half-written step behind (the temporary directory is ignored and
cleaned up). A step that exists but cannot be read (corrupted files) is reported,
moved aside to ``<step>.corrupt``, and the previous good step is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("rlx.checkpoint")


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
        args = {"state": ocp.args.StandardSave(state),
                "data": ocp.args.JsonSave(data_state or {}),
                "extra": ocp.args.JsonSave(extra or {})}
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
        says how to lay the arrays out. Unreadable steps are moved aside and skipped.
        """
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(), extra=ocp.args.JsonRestore()))
                jax.block_until_ready(restored.state)
                return step, restored.state, dict(restored.data or {}), dict(restored.extra or {})
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


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with shardings, if given) describing ``tree``."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
