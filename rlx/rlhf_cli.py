"""``rlx rlhf`` and ``rlx dpo``: the preference experiments of ``rlx.rlhf`` from gin.

    rlx rlhf --gin_file=experiments/configs/rlhf.gin
    rlx dpo  --gin_file=experiments/configs/dpo.gin --gin_param='rlx.DPOExperiment.beta = 0.2'

Shared settings bind ``rlx.Experiment.*`` (task, model, SFT, sampler, RL sizes, run
directory); the preference settings bind ``rlx.RLHFExperiment.*`` / ``rlx.DPOExperiment.*``.
As with ``rlx train``, every binding is checked before anything is built, and the
operative config is written to ``<run_dir>/operative_config.gin``.
"""

from __future__ import annotations

import json
import logging
import os

import gin

from rlx import cli


def preference_main(kind: str, gin_files=(), gin_params=()) -> dict:
    """Parses the configuration and runs ``kind`` ("rlhf" or "dpo"); returns the summary."""
    from rlx import rlhf
    from rlx.train.cli import parse_config

    if kind not in ("rlhf", "dpo"):
        raise ValueError(f"kind must be 'rlhf' or 'dpo', got {kind!r}")
    gin.clear_config()
    parse_config(gin_files, gin_params)
    if kind == "rlhf":
        exp = rlhf.RLHFExperiment()
        summary = rlhf.run_rlhf(exp)
    else:
        exp = rlhf.DPOExperiment()
        summary = rlhf.run_dpo(exp)
    with open(os.path.join(exp.base.run_dir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    print(format_summary(summary), flush=True)
    return summary


def format_summary(s: dict) -> str:
    if s["experiment"] == "rlhf":
        before, after, phase = s["accuracy_before_rl"], s["accuracy_after_rl"], "RL"
        rows = [f"reward model         held-out pair accuracy {s['rm_accuracy']:.3f} "
                f"(untrained head {s['rm_accuracy_before']:.3f}, "
                f"{s['rm_train_pairs']} train pairs)",
                f"RL steps             {s['rl_steps']}"]
    else:
        before, after, phase = s["accuracy_before_dpo"], s["accuracy_after_dpo"], s["objective"]
        rows = [f"preference accuracy  {s['pref_accuracy']:.3f} held-out "
                f"(log-prob accuracy {s['pref_logp_accuracy_before']:.3f} -> "
                f"{s['pref_logp_accuracy']:.3f})",
                f"{phase} steps            {s['dpo_steps']}"]
    return "\n".join([
        "",
        f"=== rlx {s['experiment']} summary ===",
        f"objective            {s['objective']}  (seed {s['seed']})",
        f"held-out accuracy    {before:.3f} after SFT  ->  {after:.3f} after {phase} "
        f"({100 * (after - before):+.1f} points, verifiable reward)",
        *rows,
        f"wall time            {s['wall_seconds']:.0f} s",
        f"run directory        {s['run_dir']}",
    ])


def _configure(kind: str):
    def configure(parser) -> None:
        parser.add_argument("--gin_file", action="append", default=[],
                            help="gin config file (repeatable)")
        parser.add_argument("--gin_param", action="append", default=[],
                            help="gin binding (repeatable)")
        parser.add_argument("--summary_json", default=None,
                            help="also write the run summary to this path")

        def run(args):
            logging.basicConfig(level=logging.WARNING)
            summary = preference_main(kind, args.gin_file, args.gin_param)
            if args.summary_json:
                with open(args.summary_json, "w") as f:
                    json.dump(summary, f, indent=2)
            return 0

        parser.set_defaults(run=run)
    return configure


cli.register("rlhf", help="SFT, a Bradley-Terry reward model on preference pairs, then "
             "RL (GRPO/PPO) against it")(_configure("rlhf"))
cli.register("dpo", help="SFT, then DPO / IPO / SimPO on preference pairs")(_configure("dpo"))
