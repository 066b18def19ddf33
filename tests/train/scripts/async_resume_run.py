"""A tiny asynchronous RL run (k = 2, partial rollouts) that resumes after a kill.

Usage: async_resume_run.py RUN_DIR OUT_NPZ
Runs ``AsyncRLTrainer.run()`` (tiny model, char tokenizer, 1-digit arithmetic, GRPO
with token-level truncated IS, 6 iterations × 4 prompts × G=4, 4 new tokens in two
chunks, fixed schedule, a checkpoint every iteration) in RUN_DIR, then writes the
final training state to OUT_NPZ. Started again with the same arguments after being
killed, it resumes from its newest good checkpoint, rollout queue included.

Test hook (environment): RLX_TEST_PAUSE=step:K pauses after the update of
iteration K (1-based) changed the in-memory state and published the next version,
while later batches are queued or being generated, before its checkpoint (the save
of iteration K − 1 is complete); it writes $RLX_TEST_MARKER (saying what is in
flight) and sleeps until the process is killed.
"""

import functools
import sys
import time

run_dir, out_path = sys.argv[1], sys.argv[2]

import harness  # noqa: E402

jax = harness.setup_jax()

import numpy as np  # noqa: E402

from rlx.models import api, config  # noqa: E402
from rlx.objectives import compose, group_advantages, grpo_advantages, offpolicy  # noqa: E402
from rlx.objectives import seq_mean_token_mean, surrogates  # noqa: E402
from rlx.rewards.pool import RewardPool  # noqa: E402
from rlx.sampling.config import SamplerConfig  # noqa: E402
from rlx.tasks import get_task  # noqa: E402
from rlx.train import optim  # noqa: E402
from rlx.train import state as state_lib  # noqa: E402
from rlx.train.async_rl import AsyncConfig, AsyncRLTrainer  # noqa: E402
from rlx.train.data import ProblemStream  # noqa: E402
from rlx.train.logger import RunLogger  # noqa: E402
from rlx.train.rl import RLConfig  # noqa: E402


def _in_flight(trainer) -> str:
    """Wait (up to 60 s) until later batches are queued or being generated; name them."""
    pipe = trainer._pipeline
    deadline = time.monotonic() + 60
    while not (pipe.ready or pipe.inflight) and time.monotonic() < deadline:
        time.sleep(0.01)
    return f"; rollouts in flight: ready {sorted(pipe.ready)}, running {sorted(pipe.inflight)}"


harness.install_pause(AsyncRLTrainer, describe=_in_flight, allowed=("step",))

tok = harness.CharTokenizer()
task = get_task("arithmetic", digits=1)
problems = task.train(64, seed=0)
graphdef, params = api.init(config.model_config("tiny", vocab_size=tok.vocab_size), seed=0)
objective = compose(   # GRPO without KL, stale tokens reweighted by truncated IS
    advantages=group_advantages(grpo_advantages),
    surrogate=functools.partial(surrogates.ppo_clip_loss, eps_low=0.2),
    aggregation=seq_mean_token_mean,
    is_correction=functools.partial(offpolicy.truncated_is, cap=2.0))
tx = optim.optimizer(learning_rate=1e-2)
rl_config = RLConfig(steps=6, prompts_per_step=4, checkpoint_every=1, eval_every=0,
                     log_samples_every=0, keep_checkpoints=3)
sampler = SamplerConfig(max_new_tokens=4, num_generations=4, stop_token_ids=(tok.eos_id,),
                        pad_id=tok.pad_id, prompt_buckets=(8,), completion_buckets=(4,))
trainer = AsyncRLTrainer(
    graphdef=graphdef, state=state_lib.create(params, tx, seed=0, objective_state=objective.init()),
    tx=tx, objective=objective, tokenizer=tok, stream=ProblemStream(problems, seed=0),
    reward_pool=RewardPool(task.reward_spec(format_weight=1.0), backend="inline"), sampler=sampler,
    config=rl_config, run_dir=run_dir,
    logger=RunLogger(run_dir, total_steps=rl_config.steps, tensorboard=False, console=False),
    async_config=AsyncConfig(max_staleness=2, partial_rollouts=True, chunk_tokens=2))

trainer.run()
final = jax.device_get(trainer.state)
trainer.close()
leaves = jax.tree_util.tree_leaves_with_path(final)
np.savez(out_path, **{jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves})
print("finished", flush=True)
