"""Verifiable tasks with deterministic, disjoint train / held-out splits.

Each task draws ``Problem(prompt, answer, meta)`` objects, writes demonstrations for SFT
warm-up in exactly the format its reward checks, and names its default rewards.
"""

from rlx.tasks.arithmetic import ArithmeticTask
from rlx.tasks.base import SPLITS, Problem, Task
from rlx.tasks.countdown import CountdownTask
from rlx.tasks.registry import available_tasks, get_task, register_task
from rlx.tasks.sorting import SortingTask

__all__ = [
    "SPLITS",
    "ArithmeticTask",
    "CountdownTask",
    "Problem",
    "SortingTask",
    "Task",
    "available_tasks",
    "get_task",
    "register_task",
]
