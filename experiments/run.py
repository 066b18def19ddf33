"""Runs one shipped config: ``python experiments/run.py NAME [BINDING ...]``.

NAME is a file ``experiments/configs/NAME.gin`` (``--list`` prints them). The command
is ``rlx rlhf`` for a config that binds ``rlx.RLHFExperiment``, ``rlx dpo`` for one
that binds ``rlx.DPOExperiment``, else ``rlx train`` (``--command`` overrides). Extra
gin bindings follow, e.g.

    python experiments/run.py dapo 'rlx.train.RLConfig.steps = 10'

which is the same as

    rlx train --gin_file=experiments/configs/dapo.gin --gin_param='rlx.train.RLConfig.steps = 10'
"""

from __future__ import annotations

import argparse
import os
import re
import sys

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
COMMANDS = ("train", "rlhf", "dpo")


def names() -> list[str]:
    """The shipped configs (``base`` is the shared budget the others include)."""
    return sorted(f[:-4] for f in os.listdir(CONFIGS) if f.endswith(".gin") and f != "base.gin")


def command_for(path: str) -> str:
    """``rlhf`` / ``dpo`` when the file binds that recipe's settings, else ``train``."""
    text = open(path).read()
    if re.search(r"^\s*rlx\.RLHFExperiment\.", text, re.M):
        return "rlhf"
    if re.search(r"^\s*rlx\.DPOExperiment\.", text, re.M):
        return "dpo"
    return "train"


def argv_for(name: str, bindings: list[str], command: str | None = None) -> list[str]:
    """The ``rlx`` arguments that run config ``name`` with extra ``bindings``."""
    path = os.path.join(CONFIGS, f"{name}.gin")
    if not os.path.isfile(path):
        raise SystemExit(f"run.py: no config {name!r}; shipped: {', '.join(names())}")
    command = command or command_for(path)
    return [command, f"--gin_file={path}"] + [f"--gin_param={b}" for b in bindings]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="a config in experiments/configs/")
    ap.add_argument("bindings", nargs="*", help="extra gin bindings")
    ap.add_argument("--command", choices=COMMANDS, default=None,
                    help="the rlx subcommand (default: from the config's bindings)")
    ap.add_argument("--list", action="store_true", help="print the shipped configs")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        print("\n".join(names()))
        return 0 if args.list else 2
    from rlx import cli

    return cli.main(argv_for(args.name, args.bindings, args.command))


if __name__ == "__main__":
    sys.exit(main())
