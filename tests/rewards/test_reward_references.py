"""User reward modules named by import path, scored in worker processes (per-sample and
batched), and the training-script (``__main__``) case."""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rlx.rewards import RewardComponent, RewardPool, RewardSpec, batched, get_reward, reward_spec
from rlx.rewards import references
from rlx.tasks import Problem

P = Problem("q", "abc", {})

USER_MODULE = """
    import os
    import rlx.rewards

    def brevity(completion, problem, *, scale=1.0):
        return scale / (1 + len(completion))

    def where(completion, problem):
        return float(os.getpid())

    @rlx.rewards.batched
    def lengths(completions, problems):
        return [float(len(c)) for c in completions]

    def undecorated_batch(completions, problems):
        return [float(c == p.answer) for c, p in zip(completions, problems)]

    class Scorer:
        @staticmethod
        def exact(completion, problem):
            return float(completion == problem.answer)
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """``my_rewards_<id>.py`` in a fresh directory that is not on sys.path."""
    name = f"my_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the loader's additions
    yield tmp_path, name
    for mod in [m for m in sys.modules if name in m]:
        del sys.modules[mod]


def test_dotted_and_colon_paths_load_from_the_current_directory(user_dir, monkeypatch):
    d, name = user_dir
    monkeypatch.chdir(d)
    assert not references._on_path(str(d))
    fn = get_reward(f"{name}.brevity")
    assert fn("abc", P) == 0.25 and references._on_path(str(d))
    assert get_reward(f"{name}:Scorer.exact") is sys.modules[name].Scorer.exact
    assert references.resolve(f"{name}.Scorer.exact")[1] == f"{name}:Scorer.exact"


def test_per_sample_and_batched_user_functions_score_in_worker_processes(user_dir):
    d, name = user_dir
    path = str(d / f"{name}.py")
    spec = reward_spec(
        names=(f"{path}:brevity", f"{path}:lengths", f"{path}:where", f"{path}:undecorated_batch"),
        weights=(2.0, 0.5, 0.0, 1.0),
        kwargs={f"{path}:brevity": {"scale": 3.0}},
        batched=(f"{path}:undecorated_batch",),
    )
    assert spec.batched == (False, True, False, True)
    completions = ["", "a", "abc", "abcdefg", "abc"]
    with RewardPool(spec, num_workers=2, chunk_size=2) as pool:
        assert pool.backend == "process"
        r = pool.score(completions, [P] * 5)
        worker_pids = {w.proc.pid for w in pool._workers}
    assert r.failures == 0 and r.timeouts == 0 and r.crashes == 0, r.errors
    brevity = [3.0 / (1 + len(c)) for c in completions]
    lengths = [float(len(c)) for c in completions]
    exact = [float(c == "abc") for c in completions]
    np.testing.assert_allclose(r.components[:, 0], brevity, rtol=1e-6)
    np.testing.assert_array_equal(r.components[:, 1], lengths)
    np.testing.assert_array_equal(r.components[:, 3], exact)
    assert set(r.components[:, 2].astype(int)) <= worker_pids and os.getpid() not in worker_pids
    expected = 2.0 * np.array(brevity) + 0.5 * np.array(lengths) + np.array(exact)
    np.testing.assert_allclose(r.scores, expected, rtol=1e-6)


def test_module_on_the_path_is_imported_by_name_in_the_worker(user_dir, monkeypatch):
    d, name = user_dir
    monkeypatch.syspath_prepend(str(d))
    spec = RewardSpec((RewardComponent("brevity", ref=f"{name}:brevity"),))
    assert spec.components[0].ref == f"{name}:brevity"
    with RewardPool(spec, num_workers=1, backend="process") as pool:
        r = pool.score(["abcd"], [P])
    assert r.names == ("brevity",) and r.components[0, 0] == pytest.approx(0.2)


def test_reference_components_pickle_as_their_path(user_dir):
    d, name = user_dir
    comp = RewardComponent(f"{d / name}.py:brevity", 1.5, {"scale": 2.0})
    data = pickle.dumps(comp)
    assert str(d).encode() in data and b"def brevity" not in data
    again = pickle.loads(data)
    assert again.ref == comp.ref and again.weight == 1.5 and again("a", P) == 1.0


def test_functions_of_a_training_script_score_in_workers(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from rlx.rewards import RewardComponent, RewardPool, RewardSpec
        from rlx.tasks import Problem

        def script_reward(completion, problem):
            return float(len(completion)) + (0.5 if os.environ.get("RLX_REWARD_WORKER") else 0.0)

        if __name__ == "__main__":
            spec = RewardSpec((RewardComponent("script_reward", fn=script_reward),))
            with RewardPool(spec, num_workers=1) as pool:
                r = pool.score(["ab", "abcd"], [Problem("", "", {})] * 2)
            print(pool.backend, r.components[:, 0].tolist(), r.errors)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "process [2.5, 4.5] ()"


def test_unguarded_script_cannot_start_pools_from_its_workers(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        from rlx.rewards import RewardComponent, RewardPool, RewardSpec

        def r(completion, problem):
            return 1.0

        pool = RewardPool(RewardSpec((RewardComponent("r", fn=r),)), num_workers=1)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode != 0
    assert "reward worker failed to start" in out.stderr and "__main__" in out.stderr


@pytest.mark.parametrize(
    "ref, match",
    [
        ("no_such_module_xyz.fn", "cannot import 'no_such_module_xyz'"),
        ("json.no_such_fn", "has no attribute 'no_such_fn'"),
        ("json:__doc__", "not a function"),
        ("/nonexistent/dir/r.py:fn", "does not exist"),
        ("rewards.py", "needs a function name"),
        ("mod:", "expected 'module:function'"),
    ],
)
def test_bad_references_name_the_reference(ref, match):
    with pytest.raises(ValueError, match=match):
        RewardComponent(ref)


def test_a_module_that_fails_to_import_reports_its_error(tmp_path):
    bad = tmp_path / "broken_rewards.py"
    bad.write_text("raise SystemExit('cannot work here')\n")
    with pytest.raises(ValueError, match="importing .*broken_rewards.py raised SystemExit: cannot work here"):
        RewardComponent(f"{bad}:fn")


def test_registry_names_win_over_paths_and_unknown_names_list_both():
    assert RewardComponent("format", kwargs={"pattern": "x"}).ref is None
    with pytest.raises(ValueError, match="unknown reward name 'bleu'.*import path"):
        RewardComponent("bleu")


def test_batched_flag_and_decorator():
    def per(c, p):
        return 1.0

    @batched
    def many(cs, ps):
        return [1.0] * len(cs)

    assert not RewardComponent("p", fn=per).batched
    assert RewardComponent("m", fn=many).batched
    assert RewardComponent("m2", fn=per, batched=True).batched
    assert not RewardComponent("m3", fn=many, batched=False).batched
    with pytest.raises(ValueError, match="batched must be"):
        RewardComponent("x", fn=per, batched="yes")
    with pytest.raises(ValueError, match="batched names rewards not in names"):
        reward_spec(("format",), batched=("sorting",))
    # In-process scoring of one sample calls a batched function with one-element lists.
    assert RewardSpec((RewardComponent("m", fn=many),)).score("x", P)[0] == 1.0


def test_gin_names_a_user_reward_and_configures_the_pool(user_dir):
    import gin

    d, name = user_dir
    path = f"{d / name}.py"
    with gin.unlock_config():
        gin.parse_config(f"""
            rlx.rewards.reward_spec.names = ("{path}:lengths", "{path}:undecorated_batch")
            rlx.rewards.reward_spec.weights = (1.0, 10.0)
            rlx.rewards.reward_spec.batched = ("{path}:undecorated_batch",)
            rlx.rewards.RewardPool.num_workers = 1
            rlx.rewards.RewardPool.failure_value = -2.0
            rlx.rewards.RewardPool.memory_limit_mb = 1024
        """)
    try:
        with RewardPool(reward_spec()) as pool:
            assert (pool.backend, pool.failure_value, pool.memory_limit_mb) == ("process", -2.0, 1024.0)
            r = pool.score(["abc", "x"], [P, P])
    finally:
        gin.clear_config()
    np.testing.assert_array_equal(r.components, [[3.0, 1.0], [1.0, 0.0]])
    np.testing.assert_array_equal(r.scores, [13.0, 1.0])
