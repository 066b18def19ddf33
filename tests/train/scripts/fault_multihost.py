"""One process of a two-process RL run with faults on one host only.

Usage: fault_multihost.py PROCESS_ID PORT WORK_DIR OUT_JSON

Both processes (one CPU device each, gloo collectives, mesh (2, 1, 1)) run
``RLTrainer.run()`` for 3 GRPO iterations in WORK_DIR/run (checkpoints shared, one
per iteration) with a reward that *times out on process 1 only*; the engine scores on
process 0 and broadcasts, so both must train on the same values. Afterwards
process 1 rescores the last completions with its own pool (to show its reward really
differs there).

Then, twice, each process copies the shared checkpoints into a view of its own
(WORK_DIR/view_<case>_<pid>), process 1 corrupts step 3 in *its* view only, and both
restore: case "truncated" cuts an array file of step 3 in half (unreadable there), case
"tampered" edits the data-iterator position recorded in step 3 (its metadata digest
fails there). Every process must restore step 2, and the arrays must be the ones saved
at iteration 2.

OUT_JSON: per-iteration rewards and reward_mean, the final parameters' digest, the
digests recorded at each save, the local rescoring of process 1, and per case the
restored step, whether its arrays match iteration 2's save, and the view's listing.
"""

import json
import os
import shutil
import sys
import time

process_id, port, work, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["RLX_TEST_PROCESS_ID"] = str(process_id)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id, initialization_timeout=120,
                           heartbeat_timeout_seconds=30)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from fault_rewards import CharTokenizer  # noqa: E402
from rlx import sharding as sh  # noqa: E402
from rlx.models import api, config  # noqa: E402
from rlx.objectives import presets  # noqa: E402
from rlx.rewards.pool import RewardPool  # noqa: E402
from rlx.rewards.spec import RewardComponent, RewardSpec  # noqa: E402
from rlx.sampling.config import SamplerConfig  # noqa: E402
from rlx.tasks import get_task  # noqa: E402
from rlx.train import checkpoint as ck  # noqa: E402
from rlx.train import optim  # noqa: E402
from rlx.train import state as state_lib  # noqa: E402
from rlx.train.data import ProblemStream  # noqa: E402
from rlx.train.logger import RunLogger  # noqa: E402
from rlx.train.rl import RLConfig, RLTrainer  # noqa: E402

T0 = time.time()


def mark(what):
    print(f"[p{process_id} {time.time() - T0:7.1f}s] {what}", file=sys.stderr, flush=True)


tok = CharTokenizer()
task = get_task("arithmetic", digits=1)
problems = task.train(64, seed=0)
graphdef, params = api.init(config.model_config("tiny", vocab_size=tok.vocab_size), seed=0)
objective = presets.grpo(kl_coef=0.0)
tx = optim.optimizer(learning_rate=1e-2)
mesh = sh.make_mesh((2, 1, 1))
sampler = SamplerConfig(max_new_tokens=4, num_generations=4, stop_token_ids=(tok.eos_id,),
                        pad_id=tok.pad_id, prompt_buckets=(8,), completion_buckets=(4,))
spec = RewardSpec((RewardComponent("fault_rewards.slow_on_process_1"),
                   RewardComponent("fault_rewards.length_score", 0.5)))
pool = RewardPool(spec, backend="inline", timeout_s=0.3)
run_dir = os.path.join(work, "run")
cfg = RLConfig(steps=3, prompts_per_step=4, checkpoint_every=1, eval_every=0,
               log_samples_every=0, keep_checkpoints=5)
identity = {"test": "fault_multihost"}


def trainer_for(directory):
    return RLTrainer(
        graphdef=graphdef, state=state_lib.create(params, tx, seed=0,
                                                  objective_state=objective.init()),
        tx=tx, objective=objective, tokenizer=tok, stream=ProblemStream(problems, seed=0),
        reward_pool=pool, sampler=sampler, config=cfg, run_dir=directory, mesh=mesh,
        logger=RunLogger(directory, total_steps=cfg.steps, tensorboard=False, console=False),
        identity=identity)


# ------------------------------------------------------------- 1. the training run
trainer = trainer_for(run_dir)
saved_digests = {}
_save = trainer.save


def recording_save(force=False):
    saved_digests[trainer.iteration_index] = ck.state_digest({"policy": trainer.state})
    return _save(force)


trainer.save = recording_save
seen = {"rewards": []}
_collect = trainer.collect


def recording_collect(key):
    got = _collect(key)
    seen["rewards"].append(np.asarray(got.rewards).tolist())
    seen["texts"], seen["problems"] = got.texts, [q for q in got.problems for _ in range(4)]
    return got


trainer.collect = recording_collect
history = trainer.run()
trainer.close()
mark("trained")
out = {"rewards": seen["rewards"], "reward_mean": [r["reward_mean"] for r in history],
       "final_digest": ck.state_digest(trainer.state.params),
       "saved_digests": {str(k): v for k, v in saved_digests.items()}}
if process_id == 1:                # what this host's own pool says about the same texts
    local = pool.score(seen["texts"], seen["problems"])
    out["local_rewards"] = np.asarray(local.scores).reshape(4, 4).tolist()
    out["local_timeouts"] = int(local.timeouts)
multihost_utils.sync_global_devices("trained")


# -------------------------------------------- 2. corruption on one host's view only
def truncate(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
             for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


def tamper(step_dir):
    path = os.path.join(step_dir, "data", "metadata")
    with open(path) as f:
        data = json.load(f)
    data["rlx_tampered"] = 1
    with open(path, "w") as f:
        json.dump(data, f)


abstract = {"policy": ck.abstract_like(trainer.state, trainer.state_shardings)}
for case, corrupt in (("truncated", truncate), ("tampered", tamper)):
    view = os.path.join(work, f"view_{case}_{process_id}")
    shutil.copytree(os.path.join(run_dir, "checkpoints"), view)
    if process_id == 1:
        corrupt(os.path.join(view, "3"))
    multihost_utils.sync_global_devices(f"corrupted {case}")
    reader = ck.Checkpointer(view, identity=identity)
    step, state, data_state, extra = reader.restore_latest(abstract)
    reader.close()
    out[case] = {"step": int(step), "iteration": int(extra["iteration"]),
                 "matches_save": ck.state_digest(state) == saved_digests[int(step)],
                 "listing": sorted(os.listdir(view)), "corrupt_steps": reader.corrupt_steps}
    mark(f"{case}: restored step {step}")

with open(out_path, "w") as f:
    json.dump(out, f)
multihost_utils.sync_global_devices("done")
pool.close()
jax.distributed.shutdown()
mark("done")
