"""Task registry: ``get_task("countdown", num_numbers=4)``.

Tasks register under their ``name``; ``get_task`` is gin-configurable
(``rlx.tasks.get_task.name = "arithmetic"``), and so is each task class
(``rlx.tasks.ArithmeticTask.digits = 3``).

A name that is not registered but contains a dot is an import path to a user's task:
``get_task("my_pkg.tasks.MyTask", level=2)`` imports ``my_pkg.tasks`` and calls its
``MyTask(level=2)`` (a ``Task`` subclass or any factory returning a ``Task``), so a
user's task runs without registering it or editing rlx.
"""

from __future__ import annotations

import importlib
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


def import_object(path: str, *, what: str = "object") -> Any:
    """The object at the dotted ``path`` ``"pkg.module.attr"`` (longest importable
    module prefix, then attributes); ValueError naming ``path`` when it cannot be found."""
    parts = path.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"{what} {path!r} is not a dotted import path 'module.name'")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if module_name != missing and not module_name.startswith(missing + "."):
                raise ValueError(f"{what} {path!r}: importing {module_name} failed: "
                                 f"{err}") from err
            continue     # this prefix is not a module: try a shorter one
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(f"{what} {path!r}: module {module_name!r} has no attribute "
                             f"{'.'.join(parts[cut:])!r}") from None
        return obj
    raise ValueError(f"{what} {path!r}: no importable module in it (is its folder on "
                     "sys.path / PYTHONPATH?)")


def task_factory(name: str) -> Callable[..., Task]:
    """The factory registered as ``name``, else the class / factory at the dotted import
    path ``name``. ValueError listing the registered names otherwise."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task must be a registered name or a dotted import path, got "
                         f"{name!r}")
    if name in _TASKS:
        return _TASKS[name]
    if "." not in name:
        raise ValueError(f"unknown task name {name!r}; available: {available_tasks()}, or "
                         "a dotted import path such as 'my_pkg.tasks.MyTask'")
    factory = import_object(name, what="task")
    if not callable(factory):
        raise ValueError(f"task {name!r} is a {type(factory).__name__}, expected a Task "
                         "class or a factory returning a Task")
    return factory


def build_task(name: str, kwargs: dict | None = None) -> Task:
    """``task_factory(name)(**kwargs)``, checked to be a ``Task``; a constructor that
    rejects ``kwargs`` gives a ValueError naming the task and the arguments."""
    kwargs = dict(kwargs or {})
    factory = task_factory(name)
    try:
        task = factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"task {name!r} with arguments {kwargs}: {err}") from err
    if not isinstance(task, Task):
        raise ValueError(f"task {name!r} built a {type(task).__name__}, expected an "
                         "rlx.tasks.Task")
    return task


@gin.configurable(module="rlx.tasks")
def get_task(name: str = "arithmetic", **kwargs: Any) -> Task:
    """Builds the task registered as ``name`` (or at the import path ``name``) with
    constructor ``kwargs``."""
    return build_task(name, kwargs)


for _cls in (ArithmeticTask, CountdownTask, SortingTask):
    register_task(_cls.name, _cls)
