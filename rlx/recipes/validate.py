"""Every setting of a run checked when the configuration is built, before any work.

``check(exp)`` takes an ``rlx.Experiment``, ``rlx.RLHFExperiment`` or
``rlx.DPOExperiment`` and raises one ``ValueError`` that lists every bad setting, each
as ``<binding>=<value>: <what is allowed>`` (``rlx.Experiment.sft_steps=-5: must be an
integer >= 0 (0 skips the warm-up)``): sizes and counts (integers in range, booleans and
strings refused), rates (finite, positive), paths (``hf_checkpoint`` a folder with a
config.json, data and tokenizer files that exist, a run directory that is not a file),
names (the objective, the task, the rewards, the model preset, corruptions, losses) and
the gin-bound settings built later in the run (``rlx.train.PhaseCheckpoints``, the
AdamW settings of ``rlx.train.optimizer``). It then runs the recipes' ownership check
(``rlx.recipes.bindings``), so a binding a run would ignore is refused here too.

Nothing is read but file metadata, nothing is written, trained or compiled:
``prepare.plan`` calls it first, and ``rlx train`` / ``rlx rlhf`` / ``rlx dpo`` call it
before writing the operative configuration at the start of a run. ``RLConfig`` and
``SamplerConfig`` check their own fields when they are built (with the experiment).
Settings left ``None`` for their mode default (``Experiment.resolved()``) are checked
at their resolved values.
"""

from __future__ import annotations

import math
import os
from typing import Any

_EXP = "rlx.Experiment"


class _Problems:
    """Collects '<binding>=<value>: <rule>' lines."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, name: str, value: Any, rule: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        self.lines.append(f"{name}={shown}: {rule}")

    def integer(self, name, value, minimum, why=""):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.add(name, value, f"must be an integer >= {minimum}{why}")
            return False
        return True

    def rate(self, name, value, *, zero_ok=False, none_ok=False, why=""):
        if value is None and none_ok:
            return True
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            self.add(name, value, f"must be a finite number {'>= 0' if zero_ok else '> 0'}"
                     + (" or None" if none_ok else "") + why)
            return False
        return True

    def flag(self, name, value, *, none_ok=False):
        if not (isinstance(value, bool) or (value is None and none_ok)):
            self.add(name, value, "must be True or False" + (" (or None)" if none_ok else ""))

    def one_of(self, name, value, allowed):
        if value not in allowed:
            self.add(name, value, f"must be one of {tuple(allowed)}")

    def file(self, name, value, what="file"):
        if value is None:
            return
        if not isinstance(value, str) or not value:
            self.add(name, value, f"must be the path of a {what} (a non-empty string)")
        elif not os.path.exists(value):
            self.add(name, value, f"no such {what}")
        elif what == "file" and not os.path.isfile(value):
            self.add(name, value, "is not a file")

    def named(self, name, value, resolve):
        """``resolve(value)`` must succeed (its ValueError is the reason)."""
        try:
            resolve(value)
        except (ValueError, ImportError, TypeError, AttributeError) as err:
            text = " ".join(str(err).split())
            self.lines.append(f"{name}={value!r}: {text}")
            return False
        return True


# ------------------------------------------------------------------ experiment
def _experiment(exp, out: _Problems) -> None:
    from rlx.models import config as model_lib
    from rlx.recipes import components
    from rlx.rewards import spec as spec_lib
    from rlx.tasks.base import Task

    if hasattr(exp, "resolved"):
        exp = exp.resolved()
    e = _EXP
    if not isinstance(exp.run_dir, str) or not exp.run_dir.strip():
        out.add(f"{e}.run_dir", exp.run_dir, "must be a non-empty path")
    elif os.path.exists(exp.run_dir) and not os.path.isdir(exp.run_dir):
        out.add(f"{e}.run_dir", exp.run_dir, "exists and is not a directory")
    # sizes and counts
    if not exp.data_file:
        out.integer(f"{e}.train_problems", exp.train_problems, 1)
    out.integer(f"{e}.eval_problems", exp.eval_problems, 1,
                " (held-out accuracy of 0 problems is undefined)")
    out.integer(f"{e}.tokenizer_vocab", exp.tokenizer_vocab, 8)
    out.integer(f"{e}.sft_steps", exp.sft_steps, 0, " (0 skips the warm-up)")
    out.integer(f"{e}.sft_batch", exp.sft_batch, 1)
    out.integer(f"{e}.num_generations", exp.num_generations, 1)
    out.integer(f"{e}.max_new_tokens", exp.max_new_tokens, 1)
    if isinstance(exp.seed, bool) or not isinstance(exp.seed, int):
        out.add(f"{e}.seed", exp.seed, "must be an integer")
    # rates
    out.rate(f"{e}.sft_lr", exp.sft_lr)
    out.rate(f"{e}.rl_lr", exp.rl_lr)
    out.rate(f"{e}.critic_lr", exp.critic_lr)
    out.rate(f"{e}.temperature", exp.temperature, zero_ok=True, why=" (0 = greedy)")
    out.flag(f"{e}.export_hf", exp.export_hf)
    out.flag(f"{e}.use_chat_template", exp.use_chat_template, none_ok=True)
    if exp.mesh_shape is not None and (
            not isinstance(exp.mesh_shape, (tuple, list)) or len(exp.mesh_shape) != 3
            or any(isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1)
                   for n in exp.mesh_shape) or list(exp.mesh_shape).count(-1) > 1):
        out.add(f"{e}.mesh_shape", exp.mesh_shape,
                "must be None or (data, fsdp, tensor): three integers >= 1, one of them "
                "may be -1 (the remaining devices)")
    if not isinstance(exp.model_overrides, dict):
        out.add(f"{e}.model_overrides", exp.model_overrides, "must be a dict")
    if exp.task_kwargs is not None and not isinstance(exp.task_kwargs, dict):
        out.add(f"{e}.task_kwargs", exp.task_kwargs, "must be a dict or None")
    # paths
    if exp.hf_checkpoint is not None:
        path = exp.hf_checkpoint
        if not isinstance(path, str) or not path:
            out.add(f"{e}.hf_checkpoint", path, "must be the path of a Hugging Face folder")
        elif not os.path.isdir(path):
            out.add(f"{e}.hf_checkpoint", path, "no such folder (expected a Hugging Face "
                    "checkpoint folder with config.json and *.safetensors)")
        elif not os.path.isfile(os.path.join(path, "config.json")):
            out.add(f"{e}.hf_checkpoint", path, "has no config.json (not a Hugging Face "
                    "checkpoint folder)")
    elif isinstance(exp.model, str) and exp.model not in model_lib.PRESETS:
        out.add(f"{e}.model", exp.model, f"unknown preset; known: {sorted(model_lib.PRESETS)}")
    if exp.tokenizer is not None:
        if not isinstance(exp.tokenizer, str) or not os.path.exists(exp.tokenizer):
            out.add(f"{e}.tokenizer", exp.tokenizer, "no such tokenizer file or folder")
    out.file(f"{e}.data_file", exp.data_file)
    out.file(f"{e}.eval_file", exp.eval_file)
    if exp.eval_file and not exp.data_file:
        out.add(f"{e}.eval_file", exp.eval_file, "is used only with rlx.Experiment.data_file")
    # names
    out.named(f"{e}.objective", exp.objective, components.resolve_objective)
    if not exp.data_file and not isinstance(exp.task, Task):
        from rlx.tasks import registry
        out.named(f"{e}.task", exp.task, registry.task_factory)
    rewards = exp.rewards
    if isinstance(rewards, str):
        out.add(f"{e}.rewards", rewards, "must be a tuple of reward names, e.g. "
                f"({rewards!r},), or a RewardSpec")
    elif rewards and not isinstance(rewards, spec_lib.RewardSpec):
        if not isinstance(rewards, (tuple, list)):
            out.add(f"{e}.rewards", rewards, "must be a tuple of reward names or a RewardSpec")
        else:
            for name in rewards:
                if not isinstance(name, str):
                    out.add(f"{e}.rewards", name, "each reward must be a registry name or an "
                            "import path (a string)")
                else:
                    out.named(f"{e}.rewards", name, spec_lib.RewardComponent)


def _gin_built(out: _Problems) -> None:
    """Settings bound in gin for objects built later in the run."""
    import gin

    from rlx.train import checkpoint as ckpt_lib
    from rlx.train import optim

    try:
        ckpt_lib.PhaseCheckpoints()
    except ValueError as err:
        out.lines.append("rlx.train." + str(err))
    bound = gin.get_bindings(optim.optimizer)
    o = "rlx.train.optimizer"
    for name in ("weight_decay", "eps"):
        if name in bound:
            out.rate(f"{o}.{name}", bound[name], zero_ok=name == "weight_decay")
    for name in ("b1", "b2"):
        if name in bound:
            v = bound[name]
            if (isinstance(v, bool) or not isinstance(v, (int, float))
                    or not 0 <= v < 1):
                out.add(f"{o}.{name}", v, "must be in [0, 1)")
    if "grad_clip" in bound:
        out.rate(f"{o}.grad_clip", bound["grad_clip"], zero_ok=True, none_ok=True,
                 why=" (None or 0 = no clipping)")


# ----------------------------------------------------------------- preference
def _preference(exp, kind: str, out: _Problems) -> None:
    from rlx.recipes.preference_data import CORRUPTIONS

    p = f"rlx.{kind}"
    out.integer(f"{p}.pairs_per_problem", exp.pairs_per_problem, 1)
    out.integer(f"{p}.eval_pairs", exp.eval_pairs, 1)
    if exp.preference_file:
        out.file(f"{p}.preference_file", exp.preference_file)
    else:
        out.integer(f"{p}.preference_problems", exp.preference_problems, 1)
        corruptions = exp.corruptions
        if isinstance(corruptions, str) or not isinstance(corruptions, (tuple, list)) \
                or not corruptions:
            out.add(f"{p}.corruptions", corruptions,
                    f"must be a non-empty tuple of {CORRUPTIONS}")
        else:
            for c in corruptions:
                if c not in CORRUPTIONS:
                    out.add(f"{p}.corruptions", c, f"unknown kind; known: {CORRUPTIONS}")
    if kind == "RLHFExperiment":
        out.integer(f"{p}.rm_steps", exp.rm_steps, 1)
        out.integer(f"{p}.rm_batch", exp.rm_batch, 1)
        out.rate(f"{p}.rm_lr", exp.rm_lr)
        out.rate(f"{p}.rm_margin", exp.rm_margin, zero_ok=True, none_ok=True)
        out.one_of(f"{p}.reward_normalize", exp.reward_normalize, ("fixed", "batch", None))
        out.flag(f"{p}.monitor_verifiable", exp.monitor_verifiable)
    else:
        out.one_of(f"{p}.loss", exp.loss, ("dpo", "ipo", "simpo"))
        out.rate(f"{p}.beta", exp.beta)
        if not isinstance(exp.loss_kwargs, dict):
            out.add(f"{p}.loss_kwargs", exp.loss_kwargs, "must be a dict")
        out.integer(f"{p}.dpo_steps", exp.dpo_steps, 1)
        out.integer(f"{p}.dpo_batch", exp.dpo_batch, 1)
        out.rate(f"{p}.dpo_lr", exp.dpo_lr)


# ----------------------------------------------------------------------- entry
def check(exp, *, ownership: bool = True) -> None:
    """Raises one ValueError listing every bad setting of ``exp`` (module docstring);
    with ``ownership``, then the recipes' check of bindings they would ignore."""
    out = _Problems()
    base = getattr(exp, "base", None)
    if base is not None:
        _preference(exp, type(exp).__name__, out)
    else:
        base = exp
    _experiment(base, out)
    _gin_built(out)
    if out.lines:
        raise ValueError("bad settings (nothing was started):\n  " + "\n  ".join(out.lines))
    if ownership:
        from rlx.recipes import components, prepare
        from rlx.tasks import registry
        from rlx.tasks.base import Task

        settled = base.resolved() if hasattr(base, "resolved") else base
        factory = None
        if not settled.data_file and not isinstance(settled.task, Task):
            factory = registry.task_factory(settled.task)
        prepare.check_settings(settled, task_factory=factory,
                               resolved=components.resolve_objective(settled.objective))
