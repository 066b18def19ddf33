"""Objective comparison on one budget: held-out accuracy vs rollouts consumed.

    python experiments/compare.py --objectives grpo,dapo,r2vpo --seeds 0,1,2
    python experiments/compare.py --gin_param 'rlx.train.RLConfig.steps = 20'

For every seed, the SFT warm-up runs once (in ``<out>/sft_seed<S>``) and each
objective starts from a copy of it, so objectives differ only in the RL phase. Every
run uses ``experiments/configs/<objective>.gin`` (base budget: ``base.gin``) plus the
extra bindings. Prints a table (mean ± std over seeds of held-out accuracy at each
evaluation, against the rollouts generated so far: iterations × prompts × G, times the
sampling rounds when DAPO's dynamic sampling draws more; mean over seeds) and a second
table of the policy's token entropy (mean over the first and the last five
iterations, the quantity behind clip-higher's claim), and writes
``<out>/compare.png`` and ``<out>/compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import gin
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(config: str, params: list[str]) -> dict:
    from rlx.cli import train_main

    gin.clear_config()
    return train_main([os.path.join(HERE, "configs", f"{config}.gin")], params)


def _curve(run_dir: str, rollouts_per_iteration: int) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    by_step = {r["step"]: r["eval/accuracy"] for r in rows       # a resumed run logs
               if r["step"] >= 0 and "eval/accuracy" in r}       # step 0 again: keep one
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    by_step[0] = summary["accuracy_before_rl"]
    # rollouts actually generated: dynamic sampling (DAPO) may draw several rounds
    rounds = {r["step"]: r.get("dynamic_sampling/rounds", 1.0) for r in rows if r["step"] > 0}
    consumed, total = {0: 0}, 0.0
    for step in range(1, max(list(rounds) + list(by_step)) + 1):
        total += rounds.get(step, 1.0) * rollouts_per_iteration
        consumed[step] = int(round(total))
    points = [(consumed[step], acc) for step, acc in sorted(by_step.items())]
    if max(by_step) < summary["rl_steps"]:
        points.append((consumed.get(summary["rl_steps"], int(round(total))),
                       summary["accuracy_after_rl"]))
    return points


def compare(objectives: list[str], seeds: list[int], out: str, extra: list[str]) -> dict:
    os.makedirs(out, exist_ok=True)
    results: dict[str, dict[int, list]] = {}
    entropy: dict[str, dict[int, tuple[float, float]]] = {}
    for seed in seeds:
        sft_dir = os.path.join(out, f"sft_seed{seed}")
        common = extra + [f"rlx.Experiment.seed = {seed}", "rlx.Experiment.export_hf = False"]
        if not os.path.exists(os.path.join(sft_dir, "summary.json")):
            _run("grpo", common + [f'rlx.Experiment.run_dir = "{sft_dir}"',
                                   "rlx.train.RLConfig.steps = 0"])
        for name in objectives:
            run_dir = os.path.join(out, f"{name}_seed{seed}")
            os.makedirs(run_dir, exist_ok=True)
            for item in ("sft", "tokenizer.model"):
                src, dst = os.path.join(sft_dir, item), os.path.join(run_dir, item)
                if os.path.exists(src) and not os.path.exists(dst):
                    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
            _run(name, common + [f'rlx.Experiment.run_dir = "{run_dir}"'])
            per_iter = _rollouts_per_iteration(run_dir)
            results.setdefault(name, {})[seed] = _curve(run_dir, per_iter)
            entropy.setdefault(name, {})[seed] = _entropy(run_dir)
    table = _table(results) + "\n\n" + _entropy_table(entropy)
    print(table)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"accuracy": {k: {str(s): v for s, v in r.items()} for k, r in results.items()},
                   "entropy": {k: {str(s): v for s, v in r.items()} for k, r in entropy.items()}},
                  f, indent=1)
    _plot(results, os.path.join(out, "compare.png"))
    return results


def _entropy(run_dir: str, window: int = 5) -> tuple[float, float]:
    """Mean token entropy of the rollouts over the first and the last ``window`` iterations."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    values = [r["entropy/mean"] for r in rows if r["step"] > 0 and "entropy/mean" in r]
    if not values:
        return (float("nan"), float("nan"))
    return (float(np.mean(values[:window])), float(np.mean(values[-window:])))


def _entropy_table(entropy) -> str:
    lines = ["| objective | seeds | entropy, first 5 iterations | entropy, last 5 iterations |",
             "|---|---:|---|---|"]
    for name, by_seed in entropy.items():
        first, last = np.array(list(by_seed.values())).T
        lines.append(f"| {name} | {len(first)} | {first.mean():.3f} ± {first.std():.3f} | "
                     f"{last.mean():.3f} ± {last.std():.3f} |")
    return "\n".join(lines)


def _rollouts_per_iteration(run_dir: str) -> int:
    text = open(os.path.join(run_dir, "operative_config.gin")).read()
    prompts = int(_binding(text, "prompts_per_step", 16))
    group = int(_binding(text, "num_generations", 8))
    return prompts * group


def _binding(text: str, name: str, default):
    for line in text.splitlines():
        if line.strip().split(" ")[0].endswith("." + name):
            return line.split("=", 1)[1].strip()
    return default


def _table(results) -> str:
    lines = ["| objective | seeds | rollouts | held-out accuracy (mean ± std) |",
             "|---|---:|---:|---|"]
    for name, by_seed in results.items():
        curves = list(by_seed.values())
        for i in range(len(curves[0])):
            accs = [c[i][1] for c in curves if i < len(c)]
            rollouts = int(round(np.mean([c[i][0] for c in curves if i < len(c)])))
            lines.append(f"| {name} | {len(accs)} | {rollouts} | "
                         f"{np.mean(accs):.3f} ± {np.std(accs):.3f} |")
    return "\n".join(lines)


def _plot(results, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_seed in results.items():
        curves = list(by_seed.values())
        n = min(len(c) for c in curves)
        xs = [np.mean([c[i][0] for c in curves]) for i in range(n)]
        ys = np.array([[c[i][1] for i in range(n)] for c in curves])
        ax.plot(xs, ys.mean(0), marker="o", label=name)
        if len(curves) > 1:
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
    ax.set_xlabel("rollouts consumed")
    ax.set_ylabel("held-out accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", default="grpo,dapo,dr_grpo,gspo,rloo,reinforce_pp,r2vpo,bapo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--gin_param", action="append", default=[])
    args = ap.parse_args(argv)
    return compare(args.objectives.split(","), [int(s) for s in args.seeds.split(",")],
                   args.out, args.gin_param)


if __name__ == "__main__":
    main(sys.argv[1:])
