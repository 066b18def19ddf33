"""Benchmark: ``RLTrainer.iteration()`` on the peer GRPO workload, time split by phase.

    .venv/bin/python benchmarks/rl_step.py                          # the peer workload
    .venv/bin/python benchmarks/rl_step.py --shared_prefix_update   # Prefix Grouper layout
    .venv/bin/python benchmarks/rl_step.py --minibatches 4 --json runs/rl_step.json
    .venv/bin/python benchmarks/rl_step.py --quick                  # smoke test, tiny sizes
    # another commit: git worktree add /tmp/rlx-old <commit>, then
    .venv/bin/python benchmarks/rl_step.py --rlx_root /tmp/rlx-old

Workload (``benchmarks/_workload.py``): a 3.2M-parameter Qwen2-shaped policy, 16 prompts
× G = 8, 32 prompt + 64 new tokens (no stop token: every row decodes 64 tokens), float32,
GRPO without KL, one AdamW step per iteration, arithmetic prompts scored by the task's
reward through ``RewardPool``. A real ``rlx.train.rl.RLTrainer`` is built and
``iteration()`` itself is timed, so tokenization, text decoding, rewards and transfers
count. ``--warmup`` iterations (the first compiles) are discarded; the table shows the
median, min and max over ``--iters`` timed iterations of every ``time/*`` key the
iteration reports (whatever this version of rlx reports), the wall time of the
``iteration()`` call measured outside it, and ``perf/*`` keys where present.

Compile counter: XLA compilations seen through ``jax.monitoring`` (the backend-compile
event) during the first iteration and after it; after it should be 0, and the names
of anything compiled later are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workload as wl  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared_prefix_update", action="store_true",
                    help="log-prob passes and update in the Prefix Grouper layout")
    ap.add_argument("--minibatches", type=int, default=1,
                    help="optimizer steps per iteration (the rollout batch split in order)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 5)")
    ap.add_argument("--reward_backend", default="inline",
                    choices=("inline", "thread", "process", "auto"))
    ap.add_argument("--quick", action="store_true",
                    help="tiny model and batch, 1 + 2 iterations (a smoke test)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--rlx_root", default=None,
                    help="checkout or git worktree whose rlx is measured (default: this one)")
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.iters is None:
        args.iters = 2 if args.quick else 5
    if args.warmup < 1 or args.iters < 1:
        ap.error("--warmup and --iters must be >= 1 (the first iteration compiles)")
    return args


def table(times: wl.IterationTimes) -> list[str]:
    total = times.median("time/iteration") or times.median("wall/iteration()")
    lines = [f"{'phase':<24} {'median s':>9} {'min s':>8} {'max s':>8} {'of iteration':>13}",
             "-" * 66]
    for key in times.keys():
        values = times.values(key)
        med = times.median(key)
        if key.startswith("perf/"):
            lines.append(f"{key:<24} {med:>9.4f}")
            continue
        share = f"{med / total:.1%}" if total else ""
        lines.append(f"{key:<24} {med:>9.3f} {min(values):>8.3f} {max(values):>8.3f} "
                     f"{share:>13}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    root = wl.use_checkout(args.rlx_root)
    import jax

    workload = wl.Workload(minibatches=args.minibatches,
                           shared_prefix_update=args.shared_prefix_update,
                           reward_backend=args.reward_backend)
    if args.quick:
        workload = workload.quick()
    rlx_desc = wl.describe_checkout(root)
    print(f"rlx: {rlx_desc}")
    print(f"machine: {wl.machine()}")
    print(f"workload: {workload.describe()}")
    print(f"iterations: {args.warmup} warm-up (discarded) + {args.iters} timed", flush=True)

    built = wl.build_trainer(workload, steps=args.warmup + args.iters)
    try:
        times = wl.time_iterations(built.trainer, warmup=args.warmup, iters=args.iters)
    finally:
        built.close()

    print()
    print("\n".join(table(times)))
    lengths = times.values("response_length")
    print()
    print(f"compilations: {times.compiles_first} in the first iteration, "
          f"{len(times.compiles_after)} after it"
          + (f" ({', '.join(sorted(set(times.compiles_after)))})" if times.compiles_after
             else ""))
    if lengths:
        print(f"response length: {min(lengths):.1f}–{max(lengths):.1f} tokens "
              f"(target {workload.new_tokens})")
    tps = times.median("tokens_per_s")
    if tps is not None:
        print(f"generated tokens/s over the whole iteration: {tps:.0f}")

    if args.json:
        out = {"rlx": rlx_desc, "machine": wl.machine(), "jax": jax.__version__,
               "workload": dataclasses.asdict(workload), "warmup": args.warmup, "iters": args.iters,
               "median": {k: times.median(k) for k in times.keys()},
               "timed_iterations": times.timed, "warmup_iterations": times.warmup,
               "compiles_first_iteration": times.compiles_first,
               "compiles_after_first_iteration": times.compiles_after}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
