"""Shared pieces of the test scripts: JAX set-up, a character tokenizer, pause hooks.

A script sets its ``sys.argv``-derived values, then calls :func:`setup_jax` (which
must run before anything imports JAX) and installs the hooks it needs with
:func:`install_pause`. Every hook waits until the saves in flight that it must not
disturb are complete, writes the file ``$RLX_TEST_MARKER`` (what it paused in) and
sleeps until the process is killed or signalled; the test then kills it.

``$RLX_TEST_PAUSE`` forms (K is 1-based):
  step:K or iter:K   the RL phase has applied the update of iteration K (in memory,
                     not yet saved; the save of iteration K - 1 is complete).
  done:DIR:K         a fixed-length phase whose checkpoint directory is named DIR
                     (SFT warm-up ``sft_progress``, ``reward_model``, ``dpo``) has
                     finished step K in memory and has not saved it yet.
  save:K, save:DIR:K the asynchronous save of step K (of the checkpoint directory
                     named DIR) has written every file into orbax's temporary
                     directory and not renamed it yet.
``$RLX_TEST_CACHE``: a persistent compilation cache directory (restarts compile quickly).
"""

from __future__ import annotations

import os
import time

from rlx.data.tokenizer import Tokenizer     # no JAX import


def setup_jax(xla_flags: str | None = None):
    """CPU only, ``highest`` matmul precision, ``$RLX_TEST_CACHE`` as the compilation
    cache; ``XLA_FLAGS`` replaced by ``xla_flags`` (dropped when None). Returns jax."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if xla_flags is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = xla_flags
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if os.environ.get("RLX_TEST_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["RLX_TEST_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet; 0 = pad, 1 = bos, 2 = eos."""

    ALPHABET = "0123456789+-*/= "

    @property
    def vocab_size(self) -> int:
        return 3 + len(self.ALPHABET)

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def pad_id(self) -> int:
        return 0

    def _encode(self, text: str) -> list[int]:
        return [3 + self.ALPHABET.index(c) for c in text]

    def decode(self, ids, *, skip_special: bool = True) -> str:
        return "".join(self.ALPHABET[i - 3] if i >= 3 else ("" if skip_special else f"<{i}>")
                       for i in map(int, ids))


def hang(reason: str) -> None:
    """Write ``$RLX_TEST_MARKER`` and sleep until killed (short naps, so a signal
    handler that raises gets to run promptly)."""
    with open(os.environ["RLX_TEST_MARKER"], "w") as f:
        f.write(reason)
    while True:
        time.sleep(0.5)


def pause_spec() -> tuple[str, str | None, int | None]:
    """``$RLX_TEST_PAUSE`` as (kind, directory or None, K); ("", None, None) if unset."""
    spec = os.environ.get("RLX_TEST_PAUSE", "")
    if not spec:
        return "", None, None
    kind, _, where = spec.partition(":")
    directory, _, at = where.rpartition(":")
    return kind, directory or None, int(at)


def pause_after_update(trainer_cls, at: int, describe=None) -> None:
    """Pause after ``trainer_cls.update_step`` of RL iteration ``at``; ``describe(trainer)``
    (optional) may wait for more and returns text added to the marker."""
    import jax

    update = trainer_cls.update_step

    def paused(self, batch):
        metrics = update(self, batch)
        if self.iteration_index + 1 == at:
            jax.block_until_ready(self.state)
            self.checkpointer.wait()         # so the newest checkpoint is exactly at - 1
            extra = describe(self) if describe is not None else ""
            hang(f"RL iteration {at} updated, not saved{extra}")
        return metrics

    trainer_cls.update_step = paused


def pause_after_phase_step(directory: str, at: int) -> None:
    """Pause when a ``PhaseLoop`` checkpointing into ``.../directory`` finished step ``at``."""
    import jax

    from rlx.train import checkpoint as ckpt_lib

    done = ckpt_lib.PhaseLoop.done

    def paused(self, step, state, **kwargs):
        if (self.directory and os.path.basename(self.directory) == directory
                and step == at):
            jax.block_until_ready(state)
            self.checkpointer.wait()
            hang(f"{directory} step {at} done, not saved")
        return done(self, step, state, **kwargs)

    ckpt_lib.PhaseLoop.done = paused


def pause_in_save(at: int, directory: str | None = None) -> None:
    """Pause the asynchronous save of step ``at`` (in a checkpoint directory named
    ``directory``, any if None) before orbax renames its temporary directory."""
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def paused(self, *args, **kwargs):
        final = self.get_final()
        if final.name == str(at) and (directory is None or final.parent.name == directory):
            hang(f"saving {self.get()}")
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = paused


def install_pause(trainer_cls=None, describe=None, allowed=("step", "iter", "done", "save")):
    """Install the hook ``$RLX_TEST_PAUSE`` asks for (nothing when it is unset)."""
    kind, directory, at = pause_spec()
    if not kind:
        return
    if kind not in allowed:
        raise SystemExit(f"RLX_TEST_PAUSE={os.environ['RLX_TEST_PAUSE']!r}: not supported here")
    if kind in ("step", "iter"):
        if trainer_cls is None:
            from rlx.train.rl import RLTrainer as trainer_cls
        pause_after_update(trainer_cls, at, describe)
    elif kind == "done":
        pause_after_phase_step(directory, at)
    elif kind == "save":
        pause_in_save(at, directory)
