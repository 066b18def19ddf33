"""One process of a (possibly multi-process) run of SFT and policy steps.

Usage: multihost_steps.py NUM_PROCESSES PROCESS_ID PORT OUT_NPZ MESH [MESH ...]
  MESH is "data,fsdp,tensor" (e.g. "4,1,1"). With NUM_PROCESSES=1 no distributed
  runtime is started (the single-process reference run).

Each process gets ``LOCAL_DEVICES`` CPU devices (env, default 2), runs
``SFT_STEPS`` SFT steps then ``POLICY_STEPS`` GRPO (kl_coef=0) policy steps on fixed
batches for every mesh, gathers the parameters to host with
``rlx.sharding.host_value`` and writes them (flattened, one vector per mesh) plus the
per-step losses to OUT_NPZ. The policy phase starts from a fresh state built on the
SFT phase's (global) parameters, as ``rlx.experiment`` does, and its final state goes
through a checkpoint save/restore in ``$CKPT_DIR/<mesh>`` (shared by all processes).
"""

import os
import sys
import time

T0 = time.time()


def mark(what):
    print(f"[{time.time() - T0:7.1f}s] {what}", file=sys.stderr, flush=True)


num_processes, process_id, port, out_path = (int(sys.argv[1]), int(sys.argv[2]),
                                             int(sys.argv[3]), sys.argv[4])
mesh_shapes = [tuple(int(n) for n in m.split(",")) for m in sys.argv[5:]]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           + os.environ.get("LOCAL_DEVICES", "2"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=120, heartbeat_timeout_seconds=30)

mark("distributed runtime up")
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlx import sharding as sh  # noqa: E402
from rlx.models import api, config  # noqa: E402
from rlx.objectives import presets  # noqa: E402
from rlx.objectives.types import PolicyBatch  # noqa: E402
from rlx.train import state as st  # noqa: E402
from rlx.train import steps  # noqa: E402
from rlx.train.batches import RolloutBatch, SFTBatch, make_sequences  # noqa: E402
from rlx.train.checkpoint import Checkpointer, abstract_like  # noqa: E402

SFT_STEPS = int(os.environ.get("SFT_STEPS", "2"))
POLICY_STEPS = int(os.environ.get("POLICY_STEPS", "2"))
ROWS, SP, T = 8, 6, 6

assert jax.process_count() == num_processes, jax.process_count()
assert jax.local_device_count() == int(os.environ.get("LOCAL_DEVICES", "2"))

cfg = config.model_config("tiny", vocab_size=64)
graphdef, params = api.init(cfg, seed=0)
# Clipping + momentum: the optimizer state mirrors (and is sharded like) the params.
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
objective = presets.grpo(kl_coef=0.0)

rng = np.random.default_rng(0)
tokens = rng.integers(0, cfg.vocab_size, (ROWS, SP + T)).astype(np.int32)
mask = np.ones((ROWS, SP + T), bool)
mask[:3, :2] = False                   # left-padded prompts
mask[5:, -2:] = False                  # short completions
loss_mask = np.zeros((ROWS, SP + T), np.float32)
loss_mask[:, SP:] = 1.0
loss_mask[~mask] = 0.0
seq = make_sequences(tokens, mask)
sft_batch = SFTBatch(seq=seq, loss_mask=jnp.asarray(loss_mask))
cmask = jnp.asarray(mask[:, SP:], jnp.float32)
policy = PolicyBatch(
    mask=cmask,
    old_logp=jnp.asarray(-rng.uniform(1.0, 4.0, (ROWS, T)), jnp.float32) * cmask,
    advantages=jnp.asarray(rng.normal(size=(ROWS, 1)) * np.ones((1, T)), jnp.float32) * cmask,
    group_ids=jnp.arange(ROWS) // 4)
rollout_batch = RolloutBatch(seq=seq, policy=policy)


gather = sh.host_value


out = {"params:init": np.concatenate([np.ravel(np.asarray(x))
                                  for x in jax.tree.leaves(params)])}
for shape in mesh_shapes:
    name = ",".join(map(str, shape))
    mesh = sh.make_mesh(shape)
    state = st.create(params, tx, seed=0, objective_state=objective.init())
    shardings = sh.state_shardings(state, mesh)
    state = sh.place(state, shardings)
    sft = sh.shard_batch(sft_batch, mesh)
    # Twice: the second time its leaves are already global arrays (as in the RL loop).
    rb = sh.shard_batch(sh.shard_batch(rollout_batch, mesh), mesh)
    sft_step = steps.jit_step(steps.make_sft_step(graphdef, tx), mesh, shardings, sft)
    policy_step = steps.jit_step(steps.make_policy_step(graphdef, tx, objective), mesh,
                                 shardings, rb)
    mark(f"mesh {name}: placed")
    losses = []
    for _ in range(SFT_STEPS):
        state, metrics = sft_step(state, sft)
        losses.append(float(metrics["sft_loss"]))
    # As in rlx.experiment: the SFT params (global arrays) start a fresh RL state.
    state = sh.place(st.create(state.params, tx, seed=0, objective_state=objective.init()),
                     shardings)
    for _ in range(POLICY_STEPS):
        state, metrics = policy_step(state, rb)
        losses.append(float(metrics["loss"]))
    mark(f"mesh {name}: stepped")
    # Checkpoint round trip with every process writing its own shards to one directory.
    ckpt = Checkpointer(os.path.join(os.environ["CKPT_DIR"], name), async_save=False)
    ckpt.save(POLICY_STEPS, state, {"next_index": 7}, {"iteration": POLICY_STEPS})
    got = ckpt.restore_latest(abstract_like(state, shardings))
    ckpt.close()
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gather(got[1])),
                                                    jax.tree.leaves(gather(state))))
    out["checkpoint:" + name] = np.asarray(
        [got[0] == POLICY_STEPS, same, got[2] == {"next_index": 7},
         got[3] == {"iteration": POLICY_STEPS},
         all(a.sharding == b.sharding
             for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(state)))])
    mark(f"mesh {name}: checkpointed")
    leaves = jax.tree.leaves(gather(state.params))
    out["params:" + name] = np.concatenate([np.ravel(np.asarray(x)) for x in leaves])
    out["losses:" + name] = np.asarray(losses)
    out["step:" + name] = np.asarray(gather(state.step))
    # The params really were split over processes (not silently replicated per host).
    out["addressable:" + name] = np.asarray(
        [all(a.is_fully_addressable for a in jax.tree.leaves(state.params))])

mark("gathered")
np.savez(out_path, **out)
if num_processes > 1:
    jax.distributed.shutdown()
mark("done")
