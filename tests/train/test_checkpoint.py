"""Checkpoints: exact round trip of the training state and the data iterator; corrupted
steps detected, reported, quarantined and skipped; partial saves ignored; keep-last-K."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.models import api, config
from rlx.objectives import presets
from rlx.tasks import get_task
from rlx.train import checkpoint as ck
from rlx.train import optim
from rlx.train import state as st
from rlx.train.data import ProblemStream


def _small_state(offset=0.0):
    """A small pytree with the leaf kinds a TrainState has (f32, bf16, int, key data)."""
    w = jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) / 7.0 + offset
    return {"w": w, "b": (jnp.linspace(-1, 1, 64) + offset).astype(jnp.bfloat16),
            "step": jnp.asarray(int(offset), jnp.int32),
            "key": jax.random.key_data(jax.random.key(int(offset)))}


def _equal(a, b) -> bool:
    pairs = jax.tree.leaves(jax.tree.map(
        lambda x, y: x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), a, b))
    return bool(pairs) and all(pairs)


def _files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def _array_files(step_dir):
    return [p for p in _files(os.path.join(step_dir, "state"))
            if os.sep + "d" + os.sep in p]


def _overwrite_with_garbage(step_dir):
    for p in _array_files(step_dir):
        size = os.path.getsize(p)
        with open(p, "wb") as f:
            f.write(np.random.default_rng(0).bytes(size))


def _truncate_largest(step_dir):
    p = max(_array_files(step_dir), key=os.path.getsize)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _flip_one_byte(step_dir):
    # A flipped bit in an uncompressed chunk reads back without any I/O error: only
    # the saved digest catches it.
    p = max(_array_files(step_dir), key=os.path.getsize)
    data = bytearray(open(p, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(p, "wb").write(bytes(data))


def _remove_state_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


def _garbage_data_state(step_dir):
    with open(os.path.join(step_dir, "data", "metadata"), "wb") as f:
        f.write(b"\x89\x00{not json")


def _empty_every_file(step_dir):
    for p in _files(step_dir):
        open(p, "wb").close()


def test_train_state_and_data_iterator_round_trip_exactly(tmp_path):
    cfg = config.model_config("tiny", vocab_size=64)
    _, params = api.init(cfg, seed=0)
    tx = optim.optimizer(learning_rate=1e-2)
    objective = presets.r2vpo()
    state = st.create(params, tx, seed=7, objective_state=objective.init())
    # One real update so the Adam moments and the objective state are non-trivial.
    grads = jax.tree.map(lambda p: jnp.cos(p), state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    obj_state = jax.tree.map(lambda x: x + 0.25, state.objective_state)
    state = state.replace(step=state.step + 3, params=jax.tree.map(jnp.add, state.params, updates),
                          opt_state=opt_state, objective_state=obj_state)

    problems = get_task("arithmetic", digits=1).train(30, seed=0)
    stream = ProblemStream(problems, seed=5)
    for _ in range(3):
        stream.next_batch(4)

    ckpt = ck.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2)
    ckpt.save(3, state, stream.get_state(), {"iteration": 3})
    expected_next = stream.next_batch(6)          # what a resumed run must see next
    ckpt.close()

    fresh = st.create(api.init(cfg, seed=1)[1], tx, seed=0, objective_state=objective.init())
    reader = ck.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2)
    step, restored, data_state, extra = reader.restore_latest(ck.abstract_like(fresh))
    assert step == 3 and extra == {"iteration": 3}
    assert _equal(restored, state)
    assert float(restored.objective_state["r2vpo"].lam) == pytest.approx(
        float(state.objective_state["r2vpo"].lam))
    assert jax.random.key_data(st.step_key(restored)).tolist() == \
        jax.random.key_data(st.step_key(state)).tolist()
    resumed = ProblemStream(problems, seed=5)
    resumed.set_state(data_state)
    assert resumed.next_batch(6) == expected_next
    reader.close()


@pytest.mark.parametrize("corrupt", [_overwrite_with_garbage, _truncate_largest, _flip_one_byte,
                                     _remove_state_item, _garbage_data_state, _empty_every_file],
                         ids=lambda f: f.__name__.strip("_"))
def test_corrupted_newest_step_is_reported_quarantined_and_skipped(tmp_path, caplog, corrupt):
    directory = str(tmp_path / "ckpt")
    writer = ck.Checkpointer(directory, keep=3, async_save=False)
    writer.save(1, _small_state(1.0), {"next_index": 4})
    writer.save(2, _small_state(2.0), {"next_index": 8})
    writer.close()
    corrupt(os.path.join(directory, "2"))

    reader = ck.Checkpointer(directory, keep=3)
    with caplog.at_level(logging.WARNING, logger="rlx.checkpoint"):
        step, state, data_state, _ = reader.restore_latest(ck.abstract_like(_small_state()))
    assert step == 1 and data_state == {"next_index": 4}
    assert _equal(state, _small_state(1.0))
    assert reader.corrupt_steps == [2]
    warnings = [r.getMessage() for r in caplog.records if r.name == "rlx.checkpoint"]
    assert len(warnings) == 1 and "step 2" in warnings[0] and "unreadable" in warnings[0]
    assert sorted(os.listdir(directory)) == ["1", "2.corrupt"]
    assert reader.steps() == [1]
    # The run goes on: step 2 can be written again and is then the newest good one.
    reader.save(2, _small_state(3.0), {"next_index": 12})
    reader.wait()
    assert reader.steps() == [1, 2]
    step, state, data_state, _ = reader.restore_latest(ck.abstract_like(_small_state()))
    assert step == 2 and _equal(state, _small_state(3.0)) and data_state == {"next_index": 12}
    reader.close()


def test_no_readable_step_restores_nothing(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    writer = ck.Checkpointer(directory, async_save=False)
    writer.save(1, _small_state(1.0))
    writer.close()
    _truncate_largest(os.path.join(directory, "1"))
    reader = ck.Checkpointer(directory)
    with caplog.at_level(logging.WARNING, logger="rlx.checkpoint"):
        assert reader.restore_latest(ck.abstract_like(_small_state())) is None
    assert reader.corrupt_steps == [1] and reader.steps() == []
    assert ck.Checkpointer(str(tmp_path / "empty")).restore_latest(
        ck.abstract_like(_small_state())) is None
    reader.close()


def test_leftover_temporary_directory_of_a_partial_save_is_ignored(tmp_path):
    directory = str(tmp_path / "ckpt")
    writer = ck.Checkpointer(directory, keep=3, async_save=False)
    writer.save(1, _small_state(1.0))
    writer.save(2, _small_state(2.0))
    writer.close()
    # What a save killed before its final rename leaves behind: a step-3 temporary
    # directory with most of a checkpoint in it, and an empty one for step 4.
    partial = os.path.join(directory, "3.orbax-checkpoint-tmp-1763782000000000")
    shutil.copytree(os.path.join(directory, "2"), partial)
    os.remove(os.path.join(partial, "_CHECKPOINT_METADATA"))
    os.makedirs(os.path.join(directory, "4.orbax-checkpoint-tmp-1763782000000001", "state"))

    reader = ck.Checkpointer(directory, keep=3)
    assert reader.steps() == [1, 2]
    step, state, _, _ = reader.restore_latest(ck.abstract_like(_small_state()))
    assert step == 2 and _equal(state, _small_state(2.0)) and reader.corrupt_steps == []
    reader.save(3, _small_state(3.0))
    reader.wait()
    assert reader.steps() == [1, 2, 3]
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]   # temporaries cleaned up
    assert _equal(reader.restore_latest(ck.abstract_like(_small_state()))[1], _small_state(3.0))
    reader.close()


def test_keeps_only_the_last_k_steps_and_saves_when_due(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = ck.Checkpointer(directory, every_steps=2, keep=2)
    saved = [s for s in range(1, 9) if ckpt.maybe_save(s, _small_state(float(s)), {"i": s})]
    ckpt.wait()
    assert saved == [2, 4, 6, 8]
    assert ckpt.steps() == [6, 8]
    assert sorted(os.listdir(directory)) == ["6", "8"]
    step, state, data_state, _ = ckpt.restore_latest(ck.abstract_like(_small_state()))
    assert step == 8 and _equal(state, _small_state(8.0)) and data_state == {"i": 8}
    ckpt.close()
    with pytest.raises(ValueError, match="every_steps=0"):
        ck.Checkpointer(directory, every_steps=0)


def test_every_minutes_triggers_a_save_after_the_interval(tmp_path):
    ckpt = ck.Checkpointer(str(tmp_path / "ckpt"), every_steps=None, every_minutes=1.0)
    assert not ckpt.due(1)
    ckpt._last_time -= 61.0                         # pretend a minute went by
    assert ckpt.due(2)
    ckpt.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint8", "bool", "key"])
def test_state_digest_changes_when_any_single_element_changes(dtype):
    rng = np.random.default_rng(0)
    if dtype == "key":
        x = jax.random.split(jax.random.key(0), 5)
        y = x.at[3].set(jax.random.key(99))
    else:
        base = jnp.asarray(rng.integers(0, 2 if dtype == "bool" else 100, (5, 3))).astype(dtype)
        y = base.at[3, 1].set(jnp.logical_not(base[3, 1]) if dtype == "bool" else base[3, 1] + 1)
        x = base
    other = jnp.zeros((2,), jnp.float32)
    dx, dy = ck.state_digest({"a": x, "b": other}), ck.state_digest({"a": y, "b": other})
    assert dx[1] == dy[1] and dx[0] != dy[0]
    # Swapping two elements (same multiset of values) is also caught.
    swapped = jnp.concatenate([x[1:2], x[0:1], x[2:]])
    if not np.array_equal(np.asarray(jax.random.key_data(swapped) if dtype == "key" else swapped),
                          np.asarray(jax.random.key_data(x) if dtype == "key" else x)):
        assert ck.state_digest({"a": swapped, "b": other})[0] != dx[0]
