"""The ``rlx`` console script.

Subcommands live in a small registry so other modules can add theirs without editing
the parser code:

    from rlx import cli

    @cli.register("train", help="run an experiment")
    def _configure(parser):                    # an argparse.ArgumentParser
        parser.add_argument("--config")
        parser.set_defaults(run=lambda args: train(args.config))   # -> int | None

and list the module in ``PLUGIN_MODULES`` (imported when the parser is built). A handler
returns an exit code (None means 0). ``ValueError`` (including ``CheckpointError``)
becomes a one-line ``rlx: error: ...`` on stderr and exit code 2.

Built in: ``rlx convert hf-to-rlx`` and ``rlx convert rlx-to-hf``. The rlx side is the
pickle-free folder of ``rlx.models.convert.save_rlx``: ``config.json`` (ModelConfig
fields) and ``params.safetensors`` keyed by '/'-joined parameter paths. Tokenizer files
found in the source folder are copied along.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable, Sequence

# Modules that register subcommands when imported (e.g. "rlx.train.cli").
PLUGIN_MODULES: list[str] = ["rlx.train.cli", "rlx.rlhf_cli"]


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
    files = convert.save_hf(args.out, config, params, dtype=args.dtype,
                            shard_size=args.shard_size, architecture=args.architecture,
                            overwrite=args.overwrite)
    copied = convert.copy_tokenizer_files(args.rlx_dir, args.out)
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
    sys.exit(main())
