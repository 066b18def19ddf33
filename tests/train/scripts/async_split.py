"""Split placement on 8 simulated CPU devices: 4 roll out, 4 train.

Usage: async_split.py OUT_JSON
Builds an ``AsyncRLTrainer`` (tiny model, k = 1, partial rollouts, placement
"split", 4 + 4 devices), runs 3 iterations and writes what the test checks: the two
meshes' device ids, where the published weights and the training state live, the
version lag, whether the parameters moved, and the error a corrupted transfer to the
rollout mesh gives.
"""

import json
import os
import sys

out_path = sys.argv[1]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from test_rl_loop import DigitTokenizer  # noqa: E402

from rlx.models import api, config  # noqa: E402
from rlx.objectives import presets  # noqa: E402
from rlx.rewards.pool import RewardResult  # noqa: E402
from rlx.sampling.config import SamplerConfig  # noqa: E402
from rlx.tasks import Problem  # noqa: E402
from rlx.train import optim  # noqa: E402
from rlx.train import state as state_lib  # noqa: E402
from rlx.train.async_rl import AsyncConfig, AsyncRLTrainer, WeightTransferError  # noqa: E402
from rlx.train.data import ProblemStream  # noqa: E402
from rlx.train.logger import RunLogger  # noqa: E402
from rlx.train.rl import RLConfig  # noqa: E402


class Pool:
    def score(self, completions, problems):
        c = np.array([[float(len(t) % 2), t.count("1") / 4.0] for t in completions], np.float32)
        return RewardResult(scores=c @ np.array([1.0, 0.5], np.float32), components=c,
                            names=("parity", "ones"), failed=np.zeros(len(c), bool), failures=0,
                            timeouts=0, errors=(), seconds=0.0)


def build(run_dir, steps):
    graphdef, params = api.init(config.model_config("tiny", vocab_size=13), seed=0)
    tx = optim.optimizer(learning_rate=3e-3)
    objective = presets.grpo(kl_coef=0.0)
    problems = [Problem(prompt=f"{i % 10}{(3 * i) % 10}", answer="0", meta={}) for i in range(16)]
    cfg = RLConfig(steps=steps, prompts_per_step=4, checkpoint_every=None, eval_every=0,
                   log_samples_every=0)
    return AsyncRLTrainer(
        graphdef=graphdef, state=state_lib.create(params, tx, seed=0,
                                                  objective_state=objective.init()),
        tx=tx, objective=objective, tokenizer=DigitTokenizer(),
        stream=ProblemStream(problems, seed=0), reward_pool=Pool(),
        sampler=SamplerConfig(max_new_tokens=4, num_generations=4, stop_token_ids=(2,),
                              completion_buckets=(4,)),
        config=cfg, run_dir=run_dir,
        logger=RunLogger(run_dir, total_steps=steps, tensorboard=False, console=False),
        async_config=AsyncConfig(max_staleness=1, placement="split", rollout_devices=4,
                                 partial_rollouts=True, chunk_tokens=2))


def ids(devices):
    return sorted(d.id for d in devices)


run_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "split_run")
trainer = build(run_dir, steps=3)
before = jax.device_get(trainer.state.params)
published = []
real = trainer._transfer


def recording(params):
    out = real(params)
    published.append(out)
    return out


trainer._transfer = recording
history = trainer.run()
trainer.close()
after = jax.device_get(trainer.state.params)
result = {
    "train_devices": ids(trainer.mesh.devices.flat),
    "rollout_devices": ids(trainer.rollout_mesh.devices.flat),
    "published_on": sorted({i for p in published for x in jax.tree.leaves(p)
                            for i in ids(x.sharding.device_set)}),
    "state_on": sorted({i for x in jax.tree.leaves(trainer.state.params)
                        for i in ids(x.sharding.device_set)}),
    "lag_max": max(r["async/lag_max"] for r in history),
    "lag_mean": float(np.mean([r["async/lag_mean"] for r in history])),
    "params_changed": any(not np.array_equal(a, b) for a, b in
                          zip(jax.tree.leaves(before), jax.tree.leaves(after))),
}

broken = build(run_dir + "_broken", steps=2)


def corrupting(params):
    out = jax.device_put(params, broken._rollout_shardings, may_alias=False)
    leaves, treedef = jax.tree.flatten(out)
    leaves[0] = jax.device_put(np.asarray(leaves[0]) + 1, leaves[0].sharding)
    return jax.tree.unflatten(treedef, leaves)


broken._transfer = corrupting
try:
    broken.run()
    result["corrupted_error"] = "no error"
except WeightTransferError as err:
    result["corrupted_error"] = str(err)
broken.close()
with open(out_path, "w") as f:
    json.dump(result, f)
print("finished", json.dumps(result), flush=True)
