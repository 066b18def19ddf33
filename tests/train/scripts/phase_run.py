"""One run of a recipe through the console entry point, with pause hooks for kill tests.

Usage: phase_run.py KIND [GIN_BINDING ...]
  KIND: train | rlhf | dpo — runs ``rlx.cli.main([KIND, --gin_param B, ...])`` on the
  CPU and exits with its code (a signal-stopped phase exits 128 + signal).

Hooks (environment). Each waits until the checkpoint saves in flight are complete,
writes the file $RLX_TEST_MARKER and sleeps until the process is killed or signalled:
  RLX_TEST_PAUSE=done:DIR:K   a fixed-length phase (SFT warm-up ``sft_progress``,
                              ``reward_model``, ``dpo``) has finished step K in
                              memory and has not saved it yet.
  RLX_TEST_PAUSE=iter:K       the RL phase has applied the update of iteration K
                              (in memory, not yet saved).
  RLX_TEST_PAUSE=save:DIR:K   the asynchronous save of step K of the checkpoint
                              directory DIR has written every file into orbax's
                              temporary directory and not renamed it yet.
$RLX_TEST_CACHE: a persistent compilation cache (restarts compile quickly).
"""

import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if os.environ.get("RLX_TEST_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["RLX_TEST_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from orbax.checkpoint._src.path import atomicity  # noqa: E402

from rlx import cli  # noqa: E402
from rlx.train import checkpoint as ckpt_lib  # noqa: E402
from rlx.train import rl  # noqa: E402


def _hang(reason: str) -> None:
    with open(os.environ["RLX_TEST_MARKER"], "w") as f:
        f.write(reason)
    while True:
        time.sleep(0.5)


hook = os.environ.get("RLX_TEST_PAUSE", "")
kind, _, where = hook.partition(":")

if kind == "done":
    directory, _, at = where.rpartition(":")
    _done = ckpt_lib.PhaseLoop.done

    def _paused_done(self, step, state, **kwargs):
        if (self.directory and os.path.basename(self.directory) == directory
                and step == int(at)):
            jax.block_until_ready(state)
            self.checkpointer.wait()
            _hang(f"{directory} step {at} done, not saved")
        return _done(self, step, state, **kwargs)

    ckpt_lib.PhaseLoop.done = _paused_done

elif kind == "iter":
    _update = rl.RLTrainer.update_step

    def _paused_update(self, batch):
        metrics = _update(self, batch)
        if self.iteration_index + 1 == int(where):
            jax.block_until_ready(self.state)
            self.checkpointer.wait()
            _hang(f"RL iteration {where} updated, not saved")
        return metrics

    rl.RLTrainer.update_step = _paused_update

elif kind == "save":
    directory, _, at = where.rpartition(":")
    _finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def _paused_finalize(self, *args, **kwargs):
        final = self.get_final()
        if final.name == at and final.parent.name == directory:
            _hang(f"saving {self.get()}")
        return await _finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = _paused_finalize

argv = [sys.argv[1]]
for binding in sys.argv[2:]:
    argv += ["--gin_param", binding]
sys.exit(cli.main(argv))
