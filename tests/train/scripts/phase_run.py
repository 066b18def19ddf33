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

import sys

import harness

harness.setup_jax()

from rlx import cli  # noqa: E402

harness.install_pause(allowed=("done", "iter", "save"))

argv = [sys.argv[1]]
for binding in sys.argv[2:]:
    argv += ["--gin_param", binding]
sys.exit(cli.main(argv))
