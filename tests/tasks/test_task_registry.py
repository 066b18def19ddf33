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


def test_dotted_path_names_a_users_task_class(tmp_path, monkeypatch):
    (tmp_path / "user_tasks.py").write_text(
        "from rlx.tasks import SortingTask\n\n"
        "class Short(SortingTask):\n    name = 'short'\n\n"
        "def make_short(**kw):\n    return Short(**kw)\n\n"
        "not_a_task = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(get_task("user_tasks.Short")).__name__ == "Short"
    assert type(get_task("user_tasks.make_short")).__name__ == "Short"
    with pytest.raises(ValueError, match="is a int, expected a Task class"):
        get_task("user_tasks.not_a_task")
    with pytest.raises(ValueError, match="module 'user_tasks' has no attribute 'Long'"):
        get_task("user_tasks.Long")
    with pytest.raises(ValueError, match="no importable module"):
        get_task("no_such_module_xyz.Task")
    with pytest.raises(ValueError, match=r"arguments \{'bogus': 1\}"):
        get_task("user_tasks.Short", bogus=1)


def test_a_factory_that_builds_something_else_is_refused():
    register_task("not_a_task", lambda **kw: object())
    with pytest.raises(ValueError, match="built a object, expected an rlx.tasks.Task"):
        get_task("not_a_task")


def test_import_error_inside_the_users_module_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_tasks.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="importing broken_tasks failed.*no_such_dependency"):
        get_task("broken_tasks.Task")
