"""rlx: JAX-native reinforcement-learning post-training for language models.

Layers (imports run downwards only): ``rlx.cli`` (the console) → ``rlx.recipes`` (what a
user runs: the default experiment, RLHF, DPO) → ``rlx.train`` (the engine) → the parts
(``rlx.models``, ``rlx.sampling``, ``rlx.objectives``, ``rlx.rewards``, ``rlx.tasks``,
``rlx.data``, ``rlx.sharding``) → ``rlx_kernels``.

The recipe classes are reachable under their gin names, ``rlx.Experiment``,
``rlx.RLHFExperiment`` and ``rlx.DPOExperiment`` (imported on first access, so
``import rlx`` stays cheap).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"Experiment": "rlx.recipes.experiment", "RLHFExperiment": "rlx.recipes.rlhf",
         "DPOExperiment": "rlx.recipes.rlhf"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
