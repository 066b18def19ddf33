"""A tiny, complete RL run that resumes from its newest good checkpoint.

Usage: resume_run.py RUN_DIR OUT_NPZ
Runs ``RLTrainer.run()`` (tiny model, char tokenizer, 1-digit arithmetic, GRPO,
6 iterations × 4 prompts × G=4, 4 new tokens, a checkpoint every iteration) in
RUN_DIR, then writes the final training state (params, optimizer state, step, key)
to OUT_NPZ. Started again with the same arguments after being killed, it resumes.

Test hooks (environment), each writing the file $RLX_TEST_MARKER and then
sleeping until the process is killed:
  RLX_TEST_PAUSE=step:K   in the middle of iteration K (1-based): after its policy
                          update changed the in-memory state, before its checkpoint
                          (the save of iteration K - 1 is complete).
  RLX_TEST_PAUSE=save:K   in the middle of the asynchronous save of iteration K: all
                          files are in orbax's temporary directory, not yet renamed.
"""

import sys

run_dir, out_path = sys.argv[1], sys.argv[2]

import harness  # noqa: E402

jax = harness.setup_jax()

import numpy as np  # noqa: E402

from rlx.models import api, config  # noqa: E402
from rlx.objectives import presets  # noqa: E402
from rlx.rewards.pool import RewardPool  # noqa: E402
from rlx.sampling.config import SamplerConfig  # noqa: E402
from rlx.tasks import get_task  # noqa: E402
from rlx.train import optim  # noqa: E402
from rlx.train import state as state_lib  # noqa: E402
from rlx.train.data import ProblemStream  # noqa: E402
from rlx.train.logger import RunLogger  # noqa: E402
from rlx.train.rl import RLConfig, RLTrainer  # noqa: E402

harness.install_pause(RLTrainer, allowed=("step", "save"))

tok = harness.CharTokenizer()
task = get_task("arithmetic", digits=1)
problems = task.train(64, seed=0)
graphdef, params = api.init(config.model_config("tiny", vocab_size=tok.vocab_size), seed=0)
objective = presets.grpo(kl_coef=0.0)
tx = optim.optimizer(learning_rate=1e-2)
rl_config = RLConfig(steps=6, prompts_per_step=4, checkpoint_every=1, eval_every=0,
                     log_samples_every=0, keep_checkpoints=3)
sampler = SamplerConfig(max_new_tokens=4, num_generations=4, stop_token_ids=(tok.eos_id,),
                        pad_id=tok.pad_id, prompt_buckets=(8,), completion_buckets=(4,))
trainer = RLTrainer(
    graphdef=graphdef, state=state_lib.create(params, tx, seed=0, objective_state=objective.init()),
    tx=tx, objective=objective, tokenizer=tok, stream=ProblemStream(problems, seed=0),
    reward_pool=RewardPool(task.reward_spec(format_weight=1.0), backend="inline"), sampler=sampler,
    config=rl_config, run_dir=run_dir,
    logger=RunLogger(run_dir, total_steps=rl_config.steps, tensorboard=False, console=False))

trainer.run()
final = jax.device_get(trainer.state)
trainer.close()
leaves = jax.tree_util.tree_leaves_with_path(final)
np.savez(out_path, **{jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves})
print("finished", flush=True)
