"""``rlx train``: run an experiment configured by gin files and bindings.

    rlx train                                   # the embedded default experiment
    rlx train --gin_file=experiments/configs/dapo.gin \\
              --gin_param='rlx.Experiment.objective = "dapo"' \\
              --gin_param='rlx.train.RLConfig.steps = 100'

Every gin binding is parsed (and checked against the registered configurables)
before anything is built or compiled, so a mistyped name fails at once with gin's
error naming it. The operative config is written to ``<run_dir>/operative_config.gin``.
"""

from __future__ import annotations

import json
import logging
import os

import gin

from rlx import cli


def _import_configurables() -> None:
    # Modules whose gin.configurable constructors may be bound from a config.
    import rlx.experiment  # noqa: F401
    import rlx.models.config  # noqa: F401
    import rlx.objectives.presets  # noqa: F401
    import rlx.sampling.config  # noqa: F401
    import rlx.sharding  # noqa: F401
    import rlx.tasks  # noqa: F401
    import rlx.train.optim  # noqa: F401
    import rlx.train.rl  # noqa: F401


def parse_config(gin_files=(), gin_params=()) -> None:
    """Parses gin files and bindings; raises ValueError naming a bad binding."""
    _import_configurables()
    for path in gin_files:
        if not os.path.isfile(path):
            raise ValueError(f"gin file {path!r} does not exist")
        # `include "base.gin"` resolves next to the including file.
        gin.add_config_file_search_path(os.path.dirname(os.path.abspath(path)))
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_params),
                                            finalize_config=False, skip_unknown=False)
    except (ValueError, KeyError, SyntaxError, TypeError) as err:
        raise ValueError(f"bad gin configuration: {err}") from err


def train_main(gin_files=(), gin_params=()) -> dict:
    from rlx.experiment import Experiment, run

    gin.clear_config()
    parse_config(gin_files, gin_params)
    exp = Experiment()
    os.makedirs(exp.run_dir, exist_ok=True)
    summary = run(exp)
    with open(os.path.join(exp.run_dir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    print(_format_summary(summary), flush=True)
    return summary


def _format_summary(s: dict) -> str:
    return "\n".join([
        "",
        "=== rlx run summary ===",
        f"objective            {s['objective']}  (seed {s['seed']})",
        f"held-out accuracy    {s['accuracy_before_rl']:.3f} after SFT  ->  "
        f"{s['accuracy_after_rl']:.3f} after RL "
        f"({100 * (s['accuracy_after_rl'] - s['accuracy_before_rl']):+.1f} points)",
        f"RL steps             {s['rl_steps']}",
        f"RL throughput        {s['rl_tokens_per_s']:.0f} generated tokens/s",
        f"wall time            {s['wall_seconds']:.0f} s",
        f"run directory        {s['run_dir']}  (metrics.jsonl, curves.png, samples.md, "
        "checkpoints/, hf_export/)",
    ])


@cli.register("train", help="run an experiment (default: the embedded CPU experiment)")
def _configure(parser) -> None:
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="gin binding, e.g. 'rlx.train.RLConfig.steps = 10' (repeatable)")
    parser.add_argument("--summary_json", default=None,
                        help="also write the run summary to this path")

    def run(args):
        logging.basicConfig(level=logging.WARNING)
        summary = train_main(args.gin_file, args.gin_param)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
        return 0

    parser.set_defaults(run=run)
