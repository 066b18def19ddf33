"""Benchmark: one GRPO iteration of a fixed workload, time split by phase.

    python benchmarks/rl_step.py                 # tiny preset (+ a reduced 0.5B on CPU)
    python benchmarks/rl_step.py --preset qwen2.5-0.5b --prompts 16 --group 8 --new 64

Workload: P prompts × G rollouts, prompts of 32 random tokens, exactly ``--new``
completion tokens (no stop token), random weights. Phases: generate (prefill + decode
loop), reward (a trivial host function, to show host overhead), old + reference
log-prob passes, and the GRPO update step (one optimizer step over the batch). Each
phase is compiled first, then timed over ``--repeats`` runs (median).

MFU (accelerators only): model FLOPs of the update step, 6·N·tokens for the dense
parameters plus the attention term 12·L·S²·H·Dh/2 per row (causal), divided by the
step time and the device's peak dense bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlx import sharding as sh
from rlx.models import api
from rlx.models.config import model_config
from rlx.objectives import presets
from rlx.objectives.types import PolicyBatch, RewardBatch
from rlx.sampling.config import SamplerConfig
from rlx.sampling.generate import generate
from rlx.train import optim, state as st, steps
from rlx.train.batches import RolloutBatch, Sequences

from rlx.train.flops import peak_flops, train_flops


def timed(fn, repeats):
    out = fn()
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def run(preset, prompts, group, new_tokens, repeats, dtype, layers=None):
    overrides = {"dtype": dtype}
    if layers:
        overrides["num_layers"] = layers
    cfg = model_config(preset, **overrides)
    graphdef, params = api.init(cfg, seed=0)
    mesh = sh.make_mesh()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (prompts, 32)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    sampler = SamplerConfig(max_new_tokens=new_tokens, num_generations=group,
                            completion_buckets=(new_tokens,))
    objective = presets.grpo(kl_coef=0.04)
    tx = optim.optimizer(learning_rate=1e-6)
    state = sh.place(st.create(params, tx, objective_state=objective.init()),
                     sh.state_shardings(st.create(params, tx, objective_state=objective.init()), mesh))
    ref = jax.tree.map(jnp.copy, params)
    key = jax.random.key(0)

    t_gen, rollout = timed(lambda: generate(graphdef, state.params, ids, mask, key=key,
                                            config=sampler, mesh=mesh), repeats)
    b, t = rollout.completion_ids.shape
    t0 = time.perf_counter()
    rewards = np.array([float(len(r) % 3 == 0) for r in np.asarray(rollout.completion_ids)])
    t_reward = time.perf_counter() - t0
    tokens, amask, positions = rollout.sequences()
    seq = Sequences(tokens=tokens, attention_mask=amask, positions=positions)
    logp_fn = jax.jit(lambda p, s: steps.completion_outputs(graphdef, p, s, t).logp)
    t_lp, old = timed(lambda: (logp_fn(state.params, seq), logp_fn(ref, seq)), repeats)
    cmask = jnp.asarray(rollout.completion_mask, jnp.float32)
    rewards = jnp.asarray(rng.normal(size=(prompts, group)), jnp.float32)
    adv = objective.advantages(RewardBatch(rewards=rewards, mask=cmask))
    batch = sh.shard_batch(RolloutBatch(seq=seq, policy=PolicyBatch(
        mask=adv.mask, old_logp=old[0], advantages=adv.advantages, ref_logp=old[1])), mesh)
    shardings = sh.state_shardings(state, mesh)
    step = steps.jit_step(steps.make_policy_step(graphdef, tx, objective), mesh, shardings, batch)
    holder = {"s": state}

    def update():
        holder["s"], m = step(holder["s"], batch)
        return m

    t_upd, _ = timed(update, repeats)
    total = t_gen + t_reward + t_lp + t_upd
    gen_tokens = b * t
    seq_len = tokens.shape[1]
    flops = train_flops(cfg, b, seq_len)
    peak = peak_flops(jax.devices()[0])
    mfu = f"{flops / t_upd / peak:.1%}" if peak else "n/a (CPU)"
    return {"preset": preset + (f" ({layers} layers)" if layers else ""), "rows": b, "T": t,
            "generate_s": t_gen, "reward_s": t_reward, "logprobs_s": t_lp, "update_s": t_upd,
            "total_s": total, "gen_tok_per_s": gen_tokens / t_gen,
            "iter_tok_per_s": gen_tokens / total, "update_mfu": mfu}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", action="append")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--layers", type=int, default=None, help="override num_layers")
    args = ap.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    jobs = [(p, args.layers) for p in (args.preset or ["tiny"])]
    if not args.preset and on_cpu:
        jobs.append(("qwen2.5-0.5b", 2))   # CPU: 0.5B widths, 2 of 24 layers
    elif not args.preset:
        jobs.append(("qwen2.5-0.5b", None))
    print(f"device: {jax.devices()[0].device_kind} ×{jax.device_count()}, dtype {dtype}, "
          f"{args.prompts} prompts × G={args.group}, {args.new} new tokens")
    cols = ["preset", "rows", "T", "generate_s", "reward_s", "logprobs_s", "update_s",
            "total_s", "gen_tok_per_s", "iter_tok_per_s", "update_mfu"]
    print(" | ".join(cols))
    for preset, layers in jobs:
        r = run(preset, args.prompts, args.group, args.new, args.repeats, dtype, layers)
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols),
              flush=True)


if __name__ == "__main__":
    main()
