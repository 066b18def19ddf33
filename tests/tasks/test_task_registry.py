"""Task registry and gin configuration."""

import gin
import pytest

from rlx.tasks import ArithmeticTask, CountdownTask, get_task, register_task


def test_get_task_builds_the_named_task_with_kwargs():
    task = get_task("countdown", num_numbers=4)
    assert isinstance(task, CountdownTask) and task.num_numbers == 4


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown task name 'chess'.*arithmetic"):
        get_task("chess")


def test_register_task_adds_a_factory():
    register_task("arith3", lambda **kw: ArithmeticTask(digits=3, **kw))
    assert get_task("arith3").digits == (3, 3)


def test_gin_binds_task_constructors_and_get_task():
    with gin.unlock_config():
        gin.parse_config(
            """
            rlx.tasks.get_task.name = "arithmetic"
            rlx.tasks.ArithmeticTask.digits = 3
            rlx.tasks.ArithmeticTask.operators = ("*",)
            """
        )
    try:
        task = get_task()
        assert isinstance(task, ArithmeticTask)
        assert task.digits == (3, 3) and task.operators == ("*",)
    finally:
        gin.clear_config()
