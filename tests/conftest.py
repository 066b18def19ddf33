"""Shared pytest configuration: CPU, deterministic, float32 defaults."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are tiny: XLA's CPU compile (LLVM at -O2) is most of their time.
# Backend optimisation level 0 compiles them ~17% faster end to end (same numerics
# within every test's own comparisons: both sides of a comparison run with it, and the
# subprocesses that set their own XLA_FLAGS run both of theirs without it).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()
# A persistent compilation cache shared by the xdist workers and the subprocesses the
# tests start (the same tiny programs compile in many tests); keys are content hashes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".jax_cache"))
# Subprocesses (rlx runs, restarts, multi-process runs) cache every program: a second
# tiny `rlx train` of the same configuration took 8.0 s instead of 8.9 s with every
# program cached (55 entries) rather than those over 0.2 s (15). The workers themselves
# keep 0.2 s: most of their programs are compiled once and would only be written.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0":
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture
def key():
    return jax.random.key(0)



# Modules whose tests run whole experiments or several processes (the slowest in CI's
# --durations), in two groups of about equal cost. CI runs ``-n 2 --dist worksteal``:
# the first worker gets the first half of the collection, the second the other half,
# and an idle worker steals from the tail of the other's queue. Each half starts with
# one group, so the long tests run early on both workers and the short ones fill the
# end. Whole modules move, keeping module-scoped fixtures set up once per worker.
LONG_FIRST = (
    ("tests/test_experiment.py",             # worker-seconds in the clean-clone CI
     "tests/train/test_multihost.py",         # of 2026-12-01 (loaded machine):
     "tests/test_gpu_suite.py",               # 625, 263, 105, 95, 176
     "tests/train/test_shard_map_update.py",
     "tests/train/test_engine.py"),
    ("tests/train/test_phase_resume.py",      # 314, 228, 211, 201, 91, 53, 40, 30
     "tests/train/test_async_rl.py",
     "tests/test_user_path.py",
     "tests/test_rlhf.py",
     "tests/test_mesh_sharding.py",
     "tests/sampling/test_sharding.py",
     "tests/train/test_resume.py",
     "tests/train/test_faults_multihost.py"),
)


@pytest.hookimpl(trylast=True)               # after ``-m`` deselected what it does
def pytest_collection_modifyitems(config, items):
    def module(item):
        return item.nodeid.split("::", 1)[0]

    groups = [[i for path in group for i in items if module(i) == path]
              for group in LONG_FIRST]
    long_ones = {id(i) for g in groups for i in g}
    rest = [i for i in items if id(i) not in long_ones]
    fill = max(0, len(items) // 2 - len(groups[0]))
    items[:] = groups[0] + rest[:fill] + groups[1] + rest[fill:]
