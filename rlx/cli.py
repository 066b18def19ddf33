"""The ``rlx`` console script: every subcommand of rlx.

    rlx train [--gin_file F]... [--gin_param B]...   the default experiment (or any config)
    rlx rlhf  [--gin_file F]... [--gin_param B]...   reward model on preference pairs + RL
    rlx dpo   [--gin_file F]... [--gin_param B]...   DPO / IPO / SimPO on preference pairs
    rlx convert hf-to-rlx | rlx-to-hf                checkpoints between HF and rlx folders

(also ``python -m rlx.cli ...``). Several hosts: ``rlx train`` / ``rlhf`` / ``dpo`` start
``jax.distributed`` themselves before building the mesh — auto-detected on Cloud TPU
pods, SLURM and Open MPI (jax's own cluster detection), or from
``--coordinator_address HOST:PORT --num_processes N --process_id I`` given to every
process (``rlx.sharding.init_distributed``); only process 0 prints and writes files.
Every gin binding is parsed and checked against the
registered configurables before anything is built or compiled, so a mistyped name
fails at once with gin's error naming it; the recipes then refuse, still before
building anything, bindings they would ignore (``rlx.recipes.bindings``). The
operative config is written to ``<run_dir>/operative_config.gin``.

Subcommands live in a small registry so other modules can add theirs without editing
the parser code:

    from rlx import cli

    @cli.register("mine", help="run my thing")
    def _configure(parser):                    # an argparse.ArgumentParser
        parser.add_argument("--config")
        parser.set_defaults(run=lambda args: mine(args.config))   # -> int | None

and list the module in ``PLUGIN_MODULES`` (imported when the parser is built). A handler
returns an exit code (None means 0). ``ValueError`` (including ``CheckpointError``)
becomes a one-line ``rlx: error: ...`` on stderr and exit code 2.

``rlx convert``: the rlx side is the pickle-free folder of ``rlx.models.convert.save_rlx``:
``config.json`` (ModelConfig fields) and ``params.safetensors`` keyed by '/'-joined
parameter paths. Tokenizer files found in the source folder are copied along; the
Hugging Face side also gets the tokenizer's bos/eos/pad ids in config.json and a
generation_config.json (``rlx.models.convert.save_hf(tokenizer=...)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

import gin

# Modules outside this file that register subcommands when imported.
PLUGIN_MODULES: list[str] = []


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]


_REGISTRY: dict[str, Command] = {}


def register(name: str, *, help: str):  # noqa: A002 - argparse's own word
    """Decorator registering ``configure(parser)`` as the subcommand ``rlx <name>``."""
    def decorate(configure):
        if name in _REGISTRY and _REGISTRY[name].configure is not configure:
            raise ValueError(f"rlx subcommand {name!r} is already registered")
        _REGISTRY[name] = Command(name, help, configure)
        return configure
    return decorate


def commands() -> dict[str, Command]:
    """The registered subcommands (after importing PLUGIN_MODULES)."""
    for module in PLUGIN_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlx", description="rlx: JAX-native RL post-training for language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in sorted(commands().values(), key=lambda c: c.name):
        command.configure(sub.add_parser(command.name, help=command.help,
                                         description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:  # no subcommand (or a command group without its action)
        (getattr(args, "_parser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        code = run(args)
    except ValueError as e:
        print(f"rlx: error: {e}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)


# ------------------------------------------------------------------------------ gin
def _import_configurables() -> None:
    # Modules whose gin.configurable constructors a config may bind.
    import rlx.models.config  # noqa: F401
    import rlx.objectives.presets  # noqa: F401
    import rlx.recipes.experiment  # noqa: F401
    import rlx.recipes.rlhf  # noqa: F401
    import rlx.rewards.pool  # noqa: F401
    import rlx.rewards.spec  # noqa: F401
    import rlx.sampling.config  # noqa: F401
    import rlx.sharding  # noqa: F401
    import rlx.tasks  # noqa: F401
    import rlx.train.optim  # noqa: F401
    import rlx.train.async_rl  # noqa: F401
    import rlx.train.rl  # noqa: F401


def parse_config(gin_files=(), gin_params=()) -> None:
    """Parses gin files and bindings; raises ValueError naming a bad binding."""
    _import_configurables()
    for path in gin_files:
        if not os.path.isfile(path):
            raise ValueError(f"gin file {path!r} does not exist")
        # `include "base.gin"` resolves next to the including file.
        gin.add_config_file_search_path(os.path.dirname(os.path.abspath(path)))
    quiet = _DropGinSearchMisses()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_params),
                                            finalize_config=False, skip_unknown=False)
    except (ValueError, KeyError, SyntaxError, TypeError, ImportError) as err:
        raise ValueError(f"bad gin configuration: {err}") from err
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropGinSearchMisses(logging.Filter):
    """gin logs an error for every search path an ``include`` is not found under before
    the one it is found under; a file found nowhere still raises."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


def _primary() -> bool:
    import jax
    return jax.process_index() == 0


def _write_operative_config(run_dir: str, check=None) -> None:
    if check is not None:    # at the start of a run: every setting is checked first
        from rlx.recipes import validate
        validate.check(check)
    if _primary():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())


def _say(text: str) -> None:
    """Prints on process 0 only (every process of a multi-host run runs the same code)."""
    if _primary():
        print(text, flush=True)


def _gin_options(parser) -> None:
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="gin binding, e.g. 'rlx.train.RLConfig.steps = 10' (repeatable)")
    parser.add_argument("--summary_json", default=None,
                        help="also write the run summary to this path")


def _write_summary(path: str | None, summary: dict) -> None:
    if path and _primary():
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)


def _distributed_options(parser) -> None:
    group = parser.add_argument_group(
        "several hosts", "jax.distributed starts by itself on Cloud TPU pods, SLURM and "
        "Open MPI; elsewhere pass all three to every process")
    group.add_argument("--coordinator_address", "--coordinator-address",
                       dest="coordinator_address", default=None,
                       help="HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num_processes", "--num-processes", dest="num_processes",
                       type=int, default=None, help="number of processes (hosts)")
    group.add_argument("--process_id", "--process-id", dest="process_id", type=int,
                       default=None, help="this process's index, 0 .. num_processes-1")


def start_distributed(args) -> int:
    """``rlx.sharding.init_distributed`` from the parsed flags (before any device is
    touched); returns the process count."""
    from rlx import sharding
    return sharding.init_distributed(args.coordinator_address, args.num_processes,
                                     args.process_id)


# ---------------------------------------------------------------------------- train
def kernel_line(exp) -> str:
    """One line naming the live kernel backends: the dispatcher's choice for the fused
    log-prob/entropy and ratio-statistics kernels (``rlx_kernels.dispatch``), and the
    model's attention and decode paths."""
    import jax

    from rlx.models import config as model_lib
    from rlx_kernels import dispatch

    platform = jax.default_backend()
    resolved = dispatch.resolve_backend("auto")
    kind = {"reference": "pure-jnp reference", "tpu": "Pallas TPU (Mosaic)",
            "gpu": "Pallas GPU (Triton)"}[resolved.kind]
    if resolved.interpret:
        kind += " in interpret mode"
    override = dispatch.get_backend_override()
    if os.environ.get(dispatch.ENV_VAR, "").strip():
        why = f"{dispatch.ENV_VAR}={os.environ[dispatch.ENV_VAR].strip()}"
    elif override:
        why = f"set_backend({override!r})"
    else:
        why = f"auto on {platform}"

    def model_field(name):
        if name in exp.model_overrides:
            return exp.model_overrides[name]
        if not exp.hf_checkpoint:
            bound = gin.get_bindings(model_lib.model_config)
            if name in bound:
                return bound[name]
            preset = model_lib.PRESETS.get(exp.model)
            if preset is not None:
                return getattr(preset, name)
        return getattr(model_lib.ModelConfig, name)

    attention = model_field("attention_backend")
    attention += f" via {kind}" if attention != "reference" else " (jnp)"
    pages = model_field("decode_page_size")
    decode = f"paged decode ({pages}-slot pages) via {kind}" if pages else "dense decode"
    return (f"kernels: log-prob/entropy and ratio statistics -> {kind} ({why}); "
            f"attention {attention}; {decode}")


def train_main(gin_files=(), gin_params=()) -> dict:
    """``rlx train``: parses the configuration, runs ``rlx.recipes.experiment.run`` and
    returns its summary."""
    from rlx.recipes.experiment import Experiment, run

    gin.clear_config()
    parse_config(gin_files, gin_params)
    exp = Experiment()
    _say(kernel_line(exp))
    _write_operative_config(exp.run_dir, check=exp)      # so a killed run leaves it too
    summary = run(exp)
    _write_operative_config(exp.run_dir)
    _say(format_train_summary(summary))
    return summary


def format_train_summary(s: dict) -> str:
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


@register("train", help="run an experiment (default: the embedded CPU experiment)")
def _configure_train(parser) -> None:
    _gin_options(parser)
    _distributed_options(parser)

    def run(args):
        logging.basicConfig(level=logging.WARNING)
        start_distributed(args)
        _write_summary(args.summary_json, train_main(args.gin_file, args.gin_param))
        return 0

    parser.set_defaults(run=run)


# ------------------------------------------------------------------------ rlhf, dpo
def preference_main(kind: str, gin_files=(), gin_params=()) -> dict:
    """``rlx rlhf`` / ``rlx dpo``: parses the configuration and runs ``kind``; returns
    the summary. Shared settings bind ``rlx.Experiment.*``, the preference settings
    ``rlx.RLHFExperiment.*`` / ``rlx.DPOExperiment.*``."""
    from rlx.recipes import rlhf

    if kind not in ("rlhf", "dpo"):
        raise ValueError(f"kind must be 'rlhf' or 'dpo', got {kind!r}")
    gin.clear_config()
    parse_config(gin_files, gin_params)
    exp = rlhf.RLHFExperiment() if kind == "rlhf" else rlhf.DPOExperiment()
    _say(kernel_line(exp.base))
    _write_operative_config(exp.base.run_dir, check=exp)  # so a killed run leaves it too
    summary = rlhf.run_rlhf(exp) if kind == "rlhf" else rlhf.run_dpo(exp)
    _write_operative_config(exp.base.run_dir)
    _say(format_preference_summary(summary))
    return summary


def format_preference_summary(s: dict) -> str:
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


def _configure_preference(kind: str):
    def configure(parser) -> None:
        _gin_options(parser)
        _distributed_options(parser)

        def run(args):
            logging.basicConfig(level=logging.WARNING)
            start_distributed(args)
            _write_summary(args.summary_json,
                           preference_main(kind, args.gin_file, args.gin_param))
            return 0

        parser.set_defaults(run=run)
    return configure


register("rlhf", help="SFT, a Bradley-Terry reward model on preference pairs, then "
         "RL (GRPO/PPO) against it")(_configure_preference("rlhf"))
register("dpo", help="SFT, then DPO / IPO / SimPO on preference pairs")(
    _configure_preference("dpo"))


# --------------------------------------------------------------------------- convert

_DTYPES = ("float32", "bfloat16", "float16")


def _hf_to_rlx(args) -> int:
    from rlx.models import convert

    config, _, params = convert.load_hf(args.hf_dir, dtype=args.dtype)
    convert.save_rlx(args.out, config, params, overwrite=args.overwrite)
    copied = convert.copy_tokenizer_files(args.hf_dir, args.out)
    print(f"wrote {args.out}: {config.num_params:,} parameters ({args.dtype})"
          + (f", tokenizer files {copied}" if copied else ""))
    return 0


def _rlx_to_hf(args) -> int:
    from rlx.models import convert

    config, _, params = convert.load_rlx(args.rlx_dir)
    # The tokenizer (its files, bos/eos/pad ids, generation_config.json) goes through
    # save_hf; a generation_config.json without a tokenizer is carried as it is.
    tokenizer = args.rlx_dir if convert.has_tokenizer(args.rlx_dir) else None
    generation = None
    gen_path = os.path.join(args.rlx_dir, convert.GENERATION_FILE)
    if tokenizer is None and os.path.isfile(gen_path):
        with open(gen_path) as f:
            generation = json.load(f)
    files = convert.save_hf(args.out, config, params, dtype=args.dtype,
                            shard_size=args.shard_size, architecture=args.architecture,
                            overwrite=args.overwrite, tokenizer=tokenizer,
                            generation=generation)
    copied = sorted(n for n in os.listdir(args.out) if n in convert.TOKENIZER_FILES)
    print(f"wrote {args.out}: {len(files)} safetensors file(s) ({args.dtype})"
          + (f", tokenizer files {copied}" if copied else ""))
    return 0


@register("convert", help="convert checkpoints between Hugging Face and rlx folders")
def _configure_convert(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_parser=parser)
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION")

    p = sub.add_parser("hf-to-rlx", help="Hugging Face folder (config.json + safetensors) "
                       "-> rlx folder")
    p.add_argument("--hf_dir", "--hf-dir", dest="hf_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=_DTYPES, default="float32",
                   help="parameter dtype of the rlx checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_hf_to_rlx)

    p = sub.add_parser("rlx-to-hf", help="rlx folder -> Hugging Face folder that "
                       "transformers loads")
    p.add_argument("--rlx_dir", "--rlx-dir", dest="rlx_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=_DTYPES, default="float32",
                   help="tensor dtype of the safetensors files")
    p.add_argument("--shard_size", "--shard-size", dest="shard_size", default="5GB",
                   help="largest safetensors file, e.g. 5GB or 500MB")
    p.add_argument("--architecture", choices=("Qwen2ForCausalLM", "LlamaForCausalLM"),
                   default=None, help="default: Qwen2 when the model has q/k/v bias, "
                   "else Llama")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_rlx_to_hf)


if __name__ == "__main__":
    # Run the canonical module's main, so that subcommands registered by plugin modules
    # (which import ``rlx.cli``) land in the same registry as the built-in ones.
    from rlx.cli import main as _main
    sys.exit(_main())
