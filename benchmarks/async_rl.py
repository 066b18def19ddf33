"""Benchmark: asynchronous RL throughput (``AsyncRLTrainer``) with k = 0, 1, 2 on
shared devices and with a rollout/training split on 8 simulated devices.

    .venv/bin/python benchmarks/async_rl.py                 # the peer workload, all configs
    .venv/bin/python benchmarks/async_rl.py --quick         # smoke test (tiny sizes)
    .venv/bin/python benchmarks/async_rl.py --configs shared:0,shared:2 --json out.json
    .venv/bin/python benchmarks/async_rl.py --partial       # with partial rollouts

Workload: ``benchmarks/_workload.py`` (the peer GRPO workload of ``rl_step.py``: a
3.2M-parameter Qwen2-shaped policy, 16 prompts × G = 8, 32 + 64 tokens, one AdamW
step per iteration, arithmetic rewards through ``RewardPool``). A config is
``PLACEMENT:K``: ``shared:K`` runs on this process's devices, ``split:K`` (rollout 4
+ training 4) and ``shared8:K`` (the same 8 devices shared, its baseline) run in a
child process with ``--xla_force_host_platform_device_count=8``. Each run times
``trainer.iteration()`` (the fixed schedule, so k = 0 is the synchronous loop) after
``--warmup`` iterations (≥ k + 1, so the pipeline is full and compiled); the table
gives rollouts/s and generated tokens/s over the timed iterations, the median
iteration time, how long the trainer waited for rollouts, the update time (the
weight publish included) and the producer's generation time per batch, and, because
wall time on a shared machine measures the neighbours too, the process CPU time per
timed iteration (every thread: trainer, producer and XLA's; not the reward worker
processes), the cores it kept busy (CPU / wall) and "cpu vs k=0", the k = 0 config's
CPU time per iteration over this one's (> 1×: less CPU for the same rollouts).

What overlap can gain, and why:

* On this 2-core CPU, nothing is idle for the overlap to fill except host time. XLA
  already runs each decode step and the update on both cores, so sampling batch
  j + 1 while batch j updates splits the same two cores between them: the total
  arithmetic is unchanged and the two programs contend for cores and caches. What
  can be hidden is host-side work — tokenization, text decoding, Python reward
  scoring, batch assembly, per-step dispatch of the small, latency-bound decode
  loop — which runs while the other thread keeps XLA busy. The publish (a copy and
  two checksums of the parameters per version) and, with partial rollouts, the
  re-encoded prefixes (a chunk re-feeds the tokens so far under the new weights) are
  extra work. Expect a small gain or none; with the 8 simulated devices the "4 + 4
  split" is still the same two cores (8 XLA devices are threads), so it measures
  the mechanics (resharding, the rollout mesh) rather than a speed-up.
* On accelerators the two phases use hardware differently: decoding is memory- and
  latency-bound (one token per step, small matmuls, KV-cache reads), the update is
  compute-bound. With a split placement they run on disjoint chips at the same time,
  so an iteration costs about max(T_generate, T_update) + T_publish instead of
  T_generate + T_update: up to 2× when the phases are balanced (verl reports +56%
  on a 35B MoE), less when one dominates, and the publish (parameter bytes over the
  interconnect) grows with the model. With shared devices one accelerator still
  executes one program at a time, so the gain is the host work and the launch gaps
  hidden behind device compute. The price everywhere is staleness: tokens up to k
  versions old, which the off-policy corrections (``rlx.objectives.offpolicy``)
  have to account for, and in the fixed schedule up to k + 1 parameter copies on the
  rollout devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workload as wl  # noqa: E402

CHILD_PLACEMENTS = ("split", "shared8")
DEFAULT_CONFIGS = "shared:0,shared:1,shared:2,shared8:0,split:1,split:2"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help="comma-separated PLACEMENT:K (placement shared, shared8 or split)")
    ap.add_argument("--partial", action="store_true", help="partial rollouts (chunks of "
                    "⌈new_tokens / k⌉ decode steps)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed iterations (default k + 2, at least 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 6)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 timed iterations")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.iters is None:
        args.iters = 2 if args.quick else 6
    configs = []
    for item in filter(None, args.configs.split(",")):
        placement, _, k = item.partition(":")
        if placement not in ("shared",) + CHILD_PLACEMENTS or not k.isdigit():
            ap.error(f"--configs: {item!r} is not PLACEMENT:K with PLACEMENT in "
                     f"shared, shared8, split")
        configs.append((placement, int(k)))
    args.config_list = configs
    return args


def build(workload, placement: str, k: int, partial: bool, steps: int):
    """An ``AsyncRLTrainer`` for the workload (random weights, no checkpoints)."""
    from rlx.models import api
    from rlx.objectives import presets
    from rlx.rewards.pool import RewardPool
    from rlx.train import optim, rl
    from rlx.train import state as state_lib
    from rlx.train.async_rl import AsyncConfig, AsyncRLTrainer
    from rlx.train.data import ProblemStream
    from rlx.train.logger import RunLogger

    tok = wl.char_tokenizer(workload.vocab)
    task, probs = wl.problems(workload)
    graphdef, params = api.init(workload.model_config(), seed=0)
    objective = presets.grpo(kl_coef=0.0)
    tx = optim.optimizer(learning_rate=workload.learning_rate)
    config = rl.RLConfig(steps=steps, prompts_per_step=workload.prompts, eval_every=0,
                         log_samples_every=0, checkpoint_every=None)
    pool = RewardPool(task.reward_spec(), backend=workload.reward_backend)
    run_dir = tempfile.mkdtemp(prefix="rlx-async-bench-")
    trainer = AsyncRLTrainer(
        graphdef=graphdef, state=state_lib.create(params, tx, objective_state=objective.init()),
        tx=tx, objective=objective, tokenizer=tok, stream=ProblemStream(probs, seed=0),
        reward_pool=pool, sampler=workload.sampler(tok.pad_id), config=config, run_dir=run_dir,
        logger=RunLogger(run_dir, total_steps=steps, tensorboard=False, console=False),
        async_config=AsyncConfig(max_staleness=k, partial_rollouts=partial and k > 0,
                                 placement="split" if placement == "split" else "shared"))
    return wl.Built(trainer=trainer, pool=pool, tokenizer=tok, problems=probs, run_dir=run_dir)


def measure(workload, placement: str, k: int, args) -> dict:
    warmup = args.warmup if args.warmup is not None else max(2, k + 2)
    built = build(workload, placement, k, args.partial, steps=warmup + args.iters)
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            built.trainer.iteration()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        times = wl.time_iterations(built.trainer, warmup=0, iters=args.iters)
        cpu = time.process_time() - cpu0        # every thread of this process, producer
        timed_wall = time.perf_counter() - wall0    # and XLA included; not reward workers
    finally:
        built.close()
    walls = times.values("wall/iteration()")
    rows = workload.rows
    lengths = times.values("response_length")

    def med(key):
        v = times.median(key)
        return None if v is None else float(v)

    return {"config": f"{placement}:{k}", "placement": placement, "k": k,
            "partial": bool(args.partial and k > 0), "warmup": warmup, "iters": args.iters,
            "rollouts_per_s": rows * len(walls) / sum(walls),
            "tokens_per_s": rows * statistics.mean(lengths) * len(walls) / sum(walls),
            "iteration_s": statistics.median(walls), "wait_s": med("async/wait_s"),
            "update_s": med("time/update"), "generate_s": med("producer/time_generate"),
            "publish_s": med("async/publish_s"), "lag_mean": med("async/lag_mean"),
            "cpu_s_per_iteration": cpu / args.iters, "cores_busy": cpu / timed_wall,
            "rollouts_per_cpu_s": rows * args.iters / cpu,
            "total_s": time.perf_counter() - t0}


def run_child(args, configs) -> list[dict]:
    """The 8-device configs in a child process (XLA_FLAGS must precede jax)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "child.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child",
               "--configs", ",".join(f"{p}:{k}" for p, k in configs),
               "--iters", str(args.iters), "--json", out]
        if args.quick:
            cmd.append("--quick")
        if args.partial:
            cmd.append("--partial")
        if args.warmup is not None:
            cmd += ["--warmup", str(args.warmup)]
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
               "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return json.load(f)["results"]


def table(results: list[dict]) -> list[str]:
    """One row per config; "vs k=0" against shared:0 (shared) or shared8:0 (8 devices)."""
    by_config = {r["config"]: r for r in results}
    lines = [f"{'config':<11} {'rollouts/s':>10} {'tokens/s':>9} {'iter s':>7} {'wait s':>7} "
             f"{'update s':>8} {'gen s':>6} {'lag':>5} {'vs k=0':>7} {'cpu s/it':>8} "
             f"{'cores':>5} {'cpu vs k=0':>10}", "-" * 105]

    def num(x, width, places=3):
        return f"{x:>{width}.{places}f}" if x is not None else " " * (width - 1) + "-"

    for r in results:
        ref = by_config.get("shared:0" if r["placement"] == "shared" else "shared8:0")
        rel = f"{r['rollouts_per_s'] / ref['rollouts_per_s']:.2f}×" if ref else ""
        cpu_rel = (f"{ref['cpu_s_per_iteration'] / r['cpu_s_per_iteration']:.2f}×"
                   if ref and r.get("cpu_s_per_iteration") else "")
        lines.append(f"{r['config']:<11} {r['rollouts_per_s']:>10.1f} {r['tokens_per_s']:>9.0f} "
                     f"{num(r['iteration_s'], 7)} {num(r['wait_s'], 7)} "
                     f"{num(r['update_s'], 8)} {num(r['generate_s'], 6)} "
                     f"{num(r['lag_mean'], 5, 2)} {rel:>7} "
                     f"{num(r.get('cpu_s_per_iteration'), 8)} {num(r.get('cores_busy'), 5, 2)} "
                     f"{cpu_rel:>10}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    root = wl.use_checkout(None)
    workload = wl.Workload().quick() if args.quick else wl.Workload()
    here = [(p, k) for p, k in args.config_list if p == "shared" or args.child]
    child = [(p, k) for p, k in args.config_list if p in CHILD_PLACEMENTS and not args.child]
    results = []
    if not args.child:
        print(f"rlx: {wl.describe_checkout(root)}")
        print(f"machine: {wl.machine()}")
        print(f"workload: {workload.describe()}; partial rollouts: {args.partial}", flush=True)
    for placement, k in here:
        results.append(measure(workload, placement, k, args))
        if not args.child:
            print(f"  {placement}:{k} done in {results[-1]['total_s']:.0f} s", flush=True)
    if child:
        results += run_child(args, child)
    order = {c: i for i, c in enumerate(f"{p}:{k}" for p, k in args.config_list)}
    results.sort(key=lambda r: order[r["config"]])
    if not args.child:
        print()
        print("\n".join(table(results)))
    if args.json:
        payload = {"workload": dataclasses.asdict(workload), "partial": args.partial,
                   "machine": wl.machine(), "results": results}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        if not args.child:
            print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
