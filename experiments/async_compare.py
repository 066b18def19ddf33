"""Asynchronous RL on the comparison budget: held-out accuracy vs rollouts consumed for
k = 0 (synchronous) and k = 2, with and without off-policy correction (issue 17).

    .venv/bin/python experiments/async_compare.py --out /work/async_runs --seeds 0,1,2
    .venv/bin/python experiments/async_compare.py --configs sync,k2 --seeds 0
    .venv/bin/python experiments/async_compare.py --sft_from /work/compare_run ...

Every run is the real ``rlx train`` (``rlx.cli.train_main``) with
``experiments/configs/grpo.gin`` (budget: ``base.gin``: 40 iterations × 16 prompts ×
G = 8, four minibatches per batch, evaluation every 10 iterations) plus a config's
bindings:

  sync       k = 0: the synchronous loop (no AsyncConfig binding).
  k2         ``AsyncConfig.max_staleness = 2``, old logits "sampler", GRPO without any
             IS correction: the PPO ratio is taken against the consuming version's
             log-probs, the tokens' staleness (up to 2 versions) is ignored.
  k2_exact   k = 2 with the decoupled exact correction: ``old_logits = "exact"`` (the
             producer's teacher-forced log-probs at each token's own version; tokens
             whose same-version ratio π_train/π_infer leaves the discrepancy band are
             masked) and GRPO composed with ``is_correction = truncated_is(cap=2)`` on
             the staleness factor π_old(v_now)/π_train(v_b) (``grpo_tis`` below).
  k2_ewma    as k2_exact with ``old_logits = "ewma"``, offered only when this rlx's
             AsyncConfig accepts it.

For every seed the SFT warm-up runs once (``<out>/sft_seed<S>``, the same run
``experiments/compare.py`` makes: grpo.gin with ``RLConfig.steps = 0``) and every
config starts from a copy of it; with ``--sft_from DIR`` a finished
``DIR/sft_seed<S>`` (its ``summary.json`` exists) is copied instead of re-run (DIR is
only read). The curves are read with ``experiments/compare.py``'s own helpers.
Prints and writes (``<out>/async_compare.md``, ``<out>/async_compare.json``) one table
of accuracy against rollouts consumed (mean ± std over seeds) and one of the per-run
off-policy statistics: version lag of the loss tokens (mean of ``async/lag_mean``, max
of ``async/lag_max``), the fraction of tokens the IS correction truncated
(``is/frac_corrected``) and the fraction masked by the discrepancy band
(``offpolicy/discrepancy_masked``; "ewma": ``offpolicy/proximal_masked``), the k3 KL
between the objective's ``old_logp`` and its ``sampler_logp`` slot (``offpolicy/kl_k3``:
k2 consuming-version vs sampler log-probs, k2_exact consuming-version vs exact
behaviour-version ones, k2_ewma proximal vs sampler ones), means over iterations and
seeds, and wall time.

Fixed problem (2026-12-01, d30b711): with k > 0 the producer thread and the trainer's
held-out evaluation score through the same ``RewardPool``; before ``RewardPool.score``
took a lock, one thread could receive the other's worker reply (both stopped with a
shape mismatch; it hit 4 of the 12 runs of the first comparison, which were rerun).
``--keep_going`` still reports a failed run and continues with the others.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:        # `compare` and the objective's import path below
    sys.path.insert(0, HERE)

import compare  # noqa: E402  (experiments/compare.py: its run and curve helpers)

OBJECTIVE_PATH = "async_compare.grpo_tis"
STALENESS = "rlx.train.AsyncConfig.max_staleness = 2"
CONFIGS = {
    "sync": [],
    "k2": [STALENESS],
    "k2_exact": [STALENESS, 'rlx.train.AsyncConfig.old_logits = "exact"',
                 f'rlx.Experiment.objective = "{OBJECTIVE_PATH}"'],
    "k2_ewma": [STALENESS, 'rlx.train.AsyncConfig.old_logits = "ewma"',
                f'rlx.Experiment.objective = "{OBJECTIVE_PATH}"'],
}
# per-iteration metrics summarised per run: (key, reduction over iterations)
STATS = (("async/lag_mean", "mean"), ("async/lag_max", "max"),
         ("is/frac_corrected", "mean"), ("offpolicy/discrepancy_masked", "mean"),
         ("offpolicy/proximal_masked", "mean"), ("offpolicy/kl_k3", "mean"))


def grpo_tis(cap: float = 2.0):
    """GRPO as grpo.gin configures it (PPO clip ε = 0.2, no KL, seq-mean-token-mean)
    with a token-level truncated IS weight clip(π_old/π_behaviour, 0, cap) on the
    surrogate (``rlx.objectives.offpolicy.truncated_is``)."""
    from rlx.objectives import advantages as adv_lib
    from rlx.objectives import offpolicy
    from rlx.objectives import surrogates as S
    from rlx.objectives.aggregation import seq_mean_token_mean
    from rlx.objectives.compose import compose, group_advantages

    return compose(
        advantages=group_advantages(functools.partial(adv_lib.grpo_advantages, eps=1e-6)),
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=0.2),
        aggregation=seq_mean_token_mean,
        is_correction=functools.partial(offpolicy.truncated_is, cap=cap),
        metric_eps=(0.2, 0.2))


def available_configs() -> list[str]:
    """The configs this rlx supports ("k2_ewma" only with an "ewma" old-logits mode)."""
    from rlx.train import async_rl

    names = ["sync", "k2", "k2_exact"]
    if "ewma" in getattr(async_rl, "OLD_LOGITS", ()):
        names.append("k2_ewma")
    return names


def _prepare_sft(seed: int, out: str, common: list[str], sft_from: str | None) -> str:
    """``<out>/sft_seed<S>`` with a finished SFT warm-up (copied or run here)."""
    sft_dir = os.path.join(out, f"sft_seed{seed}")
    marker = os.path.join(sft_dir, "summary.json")
    if os.path.exists(marker):
        return sft_dir
    src = os.path.join(sft_from, f"sft_seed{seed}") if sft_from else None
    if src and os.path.exists(os.path.join(src, "summary.json")):
        os.makedirs(sft_dir, exist_ok=True)
        for item in ("sft", "tokenizer.model", "summary.json"):
            s, d = os.path.join(src, item), os.path.join(sft_dir, item)
            if os.path.exists(d):
                (shutil.rmtree if os.path.isdir(d) else os.remove)(d)
            (shutil.copytree if os.path.isdir(s) else shutil.copy)(s, d)
        with open(os.path.join(sft_dir, "COPIED_FROM"), "w") as f:
            f.write(src + "\n")
        print(f"[async_compare] seed {seed}: SFT copied from {src}", flush=True)
        return sft_dir
    print(f"[async_compare] seed {seed}: running the SFT warm-up", flush=True)
    compare._run("grpo", common + [f'rlx.Experiment.run_dir = "{sft_dir}"',
                                   "rlx.train.RLConfig.steps = 0"])
    return sft_dir


def run_stats(run_dir: str) -> dict:
    """Per-run off-policy statistics from ``metrics.jsonl`` (None where not logged)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = [r for r in rows if r.get("step", 0) > 0]
    out = {}
    for key, how in STATS:
        values = [float(r[key]) for r in rows if key in r]
        out[key] = None if not values else float(np.max(values) if how == "max"
                                                  else np.mean(values))
    return out


def run_all(configs: list[str], seeds: list[int], out: str, extra: list[str],
            sft_from: str | None = None, keep_going: bool = False,
            failed: list | None = None) -> dict:
    """Runs every (seed, config); an existing run (its summary.json) is read, not re-run.
    Returns {config: {seed: {"curve", "stats", "wall_s"}}}; writes the tables and JSON
    after every run, so a stopped comparison leaves its partial results. With
    ``keep_going`` a run that raises is reported (appended to ``failed``) and skipped."""
    failed = [] if failed is None else failed
    os.makedirs(out, exist_ok=True)
    results: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        common = extra + [f"rlx.Experiment.seed = {seed}", "rlx.Experiment.export_hf = False"]
        sft_dir = _prepare_sft(seed, out, common, sft_from)
        for name in configs:
            run_dir = os.path.join(out, f"{name}_seed{seed}")
            wall = None
            if not os.path.exists(os.path.join(run_dir, "summary.json")):
                os.makedirs(run_dir, exist_ok=True)
                for item in ("sft", "tokenizer.model"):
                    s, d = os.path.join(sft_dir, item), os.path.join(run_dir, item)
                    if os.path.exists(s) and not os.path.exists(d):
                        (shutil.copytree if os.path.isdir(s) else shutil.copy)(s, d)
                print(f"[async_compare] seed {seed}: {name} starts {time.strftime('%H:%M:%S')}",
                      flush=True)
                t0 = time.perf_counter()
                try:
                    compare._run("grpo", common + CONFIGS[name] +
                                 [f'rlx.Experiment.run_dir = "{run_dir}"'])
                except Exception as e:      # one failed run does not stop the others
                    if not keep_going:
                        raise
                    print(f"[async_compare] seed {seed}: {name} FAILED: "
                          f"{type(e).__name__}: {e}", flush=True)
                    failed.append((name, seed, f"{type(e).__name__}: {e}"))
                    continue
                wall = time.perf_counter() - t0
                with open(os.path.join(run_dir, "wall_s.txt"), "w") as f:
                    f.write(f"{wall:.1f}\n")
            elif os.path.exists(os.path.join(run_dir, "wall_s.txt")):
                wall = float(open(os.path.join(run_dir, "wall_s.txt")).read())
            per_iter = compare._rollouts_per_iteration(run_dir)
            results.setdefault(name, {})[seed] = {
                "curve": compare._curve(run_dir, per_iter), "stats": run_stats(run_dir),
                "wall_s": wall}
            print(f"[async_compare] seed {seed}: {name} done "
                  f"(wall {wall if wall is None else round(wall)} s)", flush=True)
            write(results, out)
    return results


def _fmt(x, places=3):
    return "-" if x is None else f"{x:.{places}f}"


def tables(results: dict) -> str:
    lines = ["| config | seeds | rollouts consumed | held-out accuracy (mean ± std) |",
             "|---|---:|---:|---|"]
    for name, by_seed in results.items():
        curves = [r["curve"] for r in by_seed.values()]
        for i in range(max(len(c) for c in curves)):
            accs = [c[i][1] for c in curves if i < len(c)]
            rollouts = int(round(np.mean([c[i][0] for c in curves if i < len(c)])))
            lines.append(f"| {name} | {len(accs)} | {rollouts} | "
                         f"{np.mean(accs):.3f} ± {np.std(accs):.3f} |")
    lines += ["", "| config | seeds | seeds run | final accuracy | lag mean | lag max | "
              "IS-truncated frac | band-masked frac | KL(k3) old vs behaviour slot | wall s/run |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, by_seed in results.items():
        finals = [r["curve"][-1][1] for r in by_seed.values()]

        def agg(key, how):
            vals = [r["stats"][key] for r in by_seed.values() if r["stats"][key] is not None]
            if not vals:
                return None
            return float(np.max(vals) if how == "max" else np.mean(vals))

        walls = [r["wall_s"] for r in by_seed.values() if r["wall_s"] is not None]
        band = agg("offpolicy/discrepancy_masked", "mean")     # "exact": π_train/π_infer
        if band is None:                                       # "ewma": π_prox/π_infer
            band = agg("offpolicy/proximal_masked", "mean")
        lines.append(
            f"| {name} | {len(finals)} | {','.join(str(s) for s in by_seed)} | "
            f"{np.mean(finals):.3f} ± {np.std(finals):.3f} | "
            f"{_fmt(agg('async/lag_mean', 'mean'), 2)} | {_fmt(agg('async/lag_max', 'max'), 0)} | "
            f"{_fmt(agg('is/frac_corrected', 'mean'), 4)} | "
            f"{_fmt(band, 4)} | "
            f"{_fmt(agg('offpolicy/kl_k3', 'mean'), 5)} | "
            f"{_fmt(np.mean(walls) if walls else None, 0)} |")
    return "\n".join(lines)


def write(results: dict, out: str) -> str:
    text = tables(results)
    with open(os.path.join(out, "async_compare.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "async_compare.json"), "w") as f:
        json.dump({name: {str(s): r for s, r in by_seed.items()}
                   for name, by_seed in results.items()}, f, indent=1)
    return text


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=None,
                    help="comma-separated, from sync, k2, k2_exact, k2_ewma "
                         "(default: every one this rlx supports)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/async_compare")
    ap.add_argument("--sft_from", default=None,
                    help="a compare.py output folder whose finished sft_seed<S> to copy")
    ap.add_argument("--gin_param", action="append", default=[])
    ap.add_argument("--keep_going", action="store_true",
                    help="report a failed run and continue with the others")
    args = ap.parse_args(argv)
    names = args.configs.split(",") if args.configs else available_configs()
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
    failed: list = []
    results = run_all(names, [int(s) for s in args.seeds.split(",")], args.out,
                      args.gin_param, args.sft_from, keep_going=args.keep_going, failed=failed)
    print(tables(results))
    for name, seed, why in failed:
        print(f"FAILED: {name} seed {seed}: {why}")
    print(f"wrote {os.path.join(args.out, 'async_compare.md')} and async_compare.json")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
