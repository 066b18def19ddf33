"""Task registry: ``get_task("countdown", num_numbers=4)``.

Tasks register under their ``name``; ``get_task`` is gin-configurable
(``rlx.tasks.get_task.name = "arithmetic"``), and so is each task class
(``rlx.tasks.ArithmeticTask.digits = 3``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gin

from rlx.tasks.arithmetic import ArithmeticTask
from rlx.tasks.base import Task
from rlx.tasks.countdown import CountdownTask
from rlx.tasks.sorting import SortingTask

_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Registers ``factory(**kwargs) -> Task`` under ``name`` (re-registering replaces)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    _TASKS[name] = factory


def available_tasks() -> tuple[str, ...]:
    return tuple(sorted(_TASKS))


@gin.configurable(module="rlx.tasks")
def get_task(name: str = "arithmetic", **kwargs: Any) -> Task:
    """Builds the task registered as ``name`` with constructor ``kwargs``."""
    try:
        factory = _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task name {name!r}; available: {available_tasks()}") from None
    return factory(**kwargs)


for _cls in (ArithmeticTask, CountdownTask, SortingTask):
    register_task(_cls.name, _cls)
