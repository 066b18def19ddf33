"""A run's objective and task from a name, an import path or a gin reference.

``rlx.Experiment.objective`` takes

- a preset name of ``rlx.objectives.presets`` (``"grpo"``; configure it with its own
  bindings, e.g. ``rlx.objectives.dapo.eps_high = 0.3``);
- a dotted import path ``"my_pkg.my_objective"`` to an ``rlx.objectives.types.Objective``
  (e.g. a module-level ``compose(...)``) or to a callable returning one (called with no
  arguments, so its gin bindings apply when it is configurable);
- an ``Objective`` itself, e.g. from a gin reference
  ``rlx.Experiment.objective = @my_pkg.my_objective()`` (register the callable with
  ``gin.configurable`` and ``import my_pkg`` in the gin file).

``rlx.Experiment.task`` takes a registered task name (``rlx.tasks.available_tasks()``),
a dotted import path to a ``Task`` class or factory (called with
``Experiment.task_kwargs``), or a ``Task`` instance (then ``task_kwargs`` must be empty).

Everything here is resolved when a recipe starts, so an unknown name fails before
any tokenizer training, SFT or compilation, with the list of what is known.
"""

from __future__ import annotations

import dataclasses

from rlx.objectives import presets
from rlx.objectives.types import Objective
from rlx.tasks.base import Task
from rlx.tasks.registry import build_task, import_object


def preset_names() -> list[str]:
    return sorted(presets.PRESETS)


def objective_by_name(name: str, **forced) -> Objective:
    """A preset from ``rlx.objectives.presets`` by name (its gin bindings apply;
    ``forced`` keyword arguments override them)."""
    fn = presets.PRESETS.get(name)
    if fn is None:
        raise ValueError(f"unknown objective {name!r}; known presets: {preset_names()}; or "
                         "a dotted import path 'my_pkg.my_objective' to an Objective or a "
                         "function returning one")
    return fn(**forced)


@dataclasses.dataclass(frozen=True)
class ResolvedObjective:
    """The objective a run trains with.

    Attributes:
      objective: the ``Objective``.
      label: its name in summaries (the preset name, the import path, or ``"custom"``).
      separate_critic: PPO-style value learning with a separately trained critic: the
        ``"ppo"`` preset (built with ``vf_coef=0``, its critic trained by the engine's
        value step) or any objective whose ``needs`` include ``"values"``.
    """

    objective: Objective
    label: str
    separate_critic: bool


def _needs(objective) -> frozenset:
    return frozenset(getattr(objective, "needs", ()) or ())


def resolve_objective(spec) -> ResolvedObjective:
    """``spec``: a preset name, a dotted import path, or an ``Objective`` (see the module
    docstring). ValueError naming ``spec`` and the presets otherwise."""
    if isinstance(spec, Objective):
        return ResolvedObjective(spec, "custom", "values" in _needs(spec))
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"objective must be a preset name, a dotted import path or an "
                         f"Objective, got {spec!r}; known presets: {preset_names()}")
    if spec == "ppo":
        return ResolvedObjective(objective_by_name("ppo", vf_coef=0.0), "ppo", True)
    if "." not in spec:
        obj = objective_by_name(spec)
        return ResolvedObjective(obj, spec, "values" in _needs(obj))
    found = import_object(spec, what="objective")
    obj = found
    if not isinstance(found, Objective):
        if not callable(found):
            raise ValueError(f"objective {spec!r} is a {type(found).__name__}, expected an "
                             "Objective or a function returning one")
        try:
            obj = found()
        except TypeError as err:
            raise ValueError(f"objective {spec!r}: calling it with no arguments failed "
                             f"({err}); give an Objective or a function of no required "
                             "arguments") from err
        if not isinstance(obj, Objective):
            raise ValueError(f"objective {spec!r} returned a {type(obj).__name__}, expected "
                             "an rlx.objectives.types.Objective (e.g. from "
                             "rlx.objectives.compose)")
    return ResolvedObjective(obj, spec, "values" in _needs(obj))


def resolve_task(spec, kwargs: dict | None = None) -> Task:
    """``spec``: a registered name, a dotted import path (called with ``kwargs``) or a
    ``Task`` instance (``kwargs`` must then be empty)."""
    if isinstance(spec, Task):
        if kwargs:
            raise ValueError(f"task is a built {type(spec).__name__}, so task_kwargs "
                             f"{dict(kwargs)} would be ignored; leave task_kwargs empty")
        return spec
    return build_task(spec, kwargs)
