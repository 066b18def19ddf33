"""Checkpoints: exact round trip of the training state and the data iterator; corrupted
steps detected, reported, quarantined (never over an earlier quarantine) and skipped;
partial saves ignored; keep-last-K; a checkpoint of another configuration refused with
its differences named, or deliberately started afresh / warm-started; old-format steps
still restore."""

import logging
import os
import shutil
import sys

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


# ------------------------------------------------------------------- identity
IDENTITY = {"model": "tiny", "objective": "grpo", "sampler": {"temperature": 1.0}}


def _snapshot(root):
    """Every file under ``root`` with its bytes, and every directory name."""
    files = {os.path.relpath(p, root): open(p, "rb").read() for p in _files(root)}
    dirs = sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, ns, _ in os.walk(root) for n in ns)
    return files, dirs


def _write_two_steps(directory, identity=IDENTITY, state=_small_state):
    writer = ck.Checkpointer(directory, keep=3, async_save=False, identity=identity)
    writer.save(1, state(1.0), {"next_index": 4}, {"iteration": 1})
    writer.save(2, state(2.0), {"next_index": 8}, {"iteration": 2})
    writer.close()


def _changed_state(offset=0.0):
    """_small_state with one leaf added, one removed, one reshaped and one re-typed."""
    s = _small_state(offset)
    return {"w": jnp.zeros((32, 64), jnp.float32), "b": s["b"].astype(jnp.float32),
            "step": s["step"], "value_head": jnp.ones((64,), jnp.float32)}


def test_config_change_is_refused_naming_the_differences_and_touches_nothing(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    _write_two_steps(directory)
    before = _snapshot(directory)
    reader = ck.Checkpointer(directory, keep=3,
                             identity={**IDENTITY, "objective": "dapo",
                                       "sampler": {"temperature": 0.7}, "critic": "value"})
    with caplog.at_level(logging.WARNING, logger="rlx.checkpoint"), \
            pytest.raises(ck.CheckpointMismatch) as info:
        reader.restore_latest(ck.abstract_like(_changed_state()))
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, ck.CheckpointError)
    assert err.step == 2 and err.added == ["value_head"] and err.removed == ["key"]
    assert err.changed == [("b", ((64,), "bfloat16"), ((64,), "float32")),
                           ("w", ((64, 64), "float32"), ((32, 64), "float32"))]
    assert err.identity == [("critic", "<absent>", "value"), ("objective", "grpo", "dapo"),
                            ("sampler.temperature", 1.0, 0.7)]
    text = str(err)
    assert "\n" not in text and "left untouched" in text
    for piece in ("value_head", "key", "w saved (64, 64) float32, now (32, 64) float32",
                  "b saved (64,) bfloat16, now (64,) float32",
                  "objective: saved 'grpo', now 'dapo'",
                  "sampler.temperature: saved 1.0, now 0.7", "on_mismatch='fresh'"):
        assert piece in text
    assert _snapshot(directory) == before                     # byte-identical, nothing renamed
    assert reader.corrupt_steps == [] and reader.steps() == [1, 2]
    assert not [r for r in caplog.records if r.name == "rlx.checkpoint"]
    # The same structure under another identity alone is refused too; the right one restores.
    with pytest.raises(ck.CheckpointMismatch, match="objective: saved 'grpo', now 'dapo'") as info:
        ck.Checkpointer(directory, identity={**IDENTITY, "objective": "dapo"}).restore_latest(
            ck.abstract_like(_small_state()))
    assert not info.value.tree_differs
    step, state, data_state, extra = ck.Checkpointer(directory, identity=IDENTITY).restore_latest(
        ck.abstract_like(_small_state()))
    assert (step, data_state, extra) == (2, {"next_index": 8}, {"iteration": 2})
    assert _equal(state, _small_state(2.0)) and _snapshot(directory) == before
    reader.close()
    with pytest.raises(ValueError, match="on_mismatch='wipe'"):
        ck.Checkpointer(directory, on_mismatch="wipe")


def test_fresh_mode_leaves_the_old_run_alone_and_resumes_its_own_directory(tmp_path):
    directory = str(tmp_path / "ckpt")
    _write_two_steps(directory)
    before = _snapshot(directory)
    other = {**IDENTITY, "objective": "dapo"}
    first = ck.Checkpointer(directory, identity=other, on_mismatch="fresh", async_save=False)
    assert first.restore_latest(ck.abstract_like(_small_state())) is None
    assert first.directory == directory + ".fresh-1"
    assert first.last_restore.mode == "fresh" and first.last_restore.step is None
    assert first.last_restore.mismatch.identity == [("objective", "grpo", "dapo")]
    first.save(1, _small_state(5.0), {"next_index": 2}, {"iteration": 1})
    first.close()
    assert _snapshot(directory) == before
    # Rerunning the changed command resumes the fresh run; a third configuration gets its own.
    again = ck.Checkpointer(directory, identity=other, on_mismatch="fresh")
    step, state, data_state, _ = again.restore_latest(ck.abstract_like(_small_state()))
    assert step == 1 and _equal(state, _small_state(5.0)) and data_state == {"next_index": 2}
    assert again.directory == directory + ".fresh-1" and again.last_restore.mode == "fresh"
    again.close()
    third = ck.Checkpointer(directory, identity={**IDENTITY, "objective": "gspo"},
                            on_mismatch="fresh")
    assert third.restore_latest(ck.abstract_like(_small_state())) is None
    assert third.directory == directory + ".fresh-2"
    third.close()
    assert _snapshot(directory) == before
    assert ck.Checkpointer(directory + ".fresh-1").steps() == [1]


def _train_state(objective, seed=0, offset=0.0):
    cfg = config.model_config("tiny", vocab_size=64)
    _, params = api.init(cfg, seed=seed)
    params = jax.tree.map(lambda p: p + offset, params)
    return st.create(params, optim.optimizer(learning_rate=1e-2), seed=seed,
                     objective_state=objective.init())


def test_partial_warm_start_restores_matching_leaves_and_initialises_the_rest(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    saved = _train_state(presets.r2vpo(), seed=0, offset=0.5)    # R²VPO carries a dual variable
    writer = ck.Checkpointer(directory, async_save=False, identity={"objective": "r2vpo"})
    writer.save(4, {"policy": saved, "critic": {"head": jnp.ones((3,))}}, {"next_index": 4},
                {"iteration": 4})
    writer.close()
    before = _snapshot(directory)

    fresh = {"policy": _train_state(presets.grpo(), seed=1), "critic": {"head": jnp.zeros((5,))}}
    reader = ck.Checkpointer(directory, identity={"objective": "grpo"}, on_mismatch="partial")
    with pytest.raises(ValueError, match="init_state"):
        reader.restore_latest(ck.abstract_like(fresh))
    with caplog.at_level(logging.WARNING, logger="rlx.checkpoint"):
        step, state, data_state, extra = reader.restore_latest(ck.abstract_like(fresh),
                                                               init_state=fresh)
    assert (step, data_state, extra) == (4, {"next_index": 4}, {"iteration": 4})
    report = reader.last_restore
    assert report.mode == "partial"
    assert report.initialised == ["critic/head", "policy/objective_state/kl/coef"]
    assert report.mismatch.removed == ["policy/objective_state/r2vpo/lam"]
    assert report.mismatch.identity == [("objective", "r2vpo", "grpo")]
    assert len(report.restored) == len(jax.tree.leaves(saved)) - 1
    policy = state["policy"]
    for field in ("params", "opt_state", "step", "key"):       # warm-started from the checkpoint
        assert _equal(getattr(policy, field), getattr(saved, field)), field
    assert _equal(policy.objective_state, fresh["policy"].objective_state)   # GRPO's own init
    assert np.array_equal(np.asarray(state["critic"]["head"]), np.zeros(5))
    assert jax.tree.structure(state) == jax.tree.structure(fresh)
    warnings = [r.getMessage() for r in caplog.records if r.name == "rlx.checkpoint"]
    assert len(warnings) == 1 and "warm start" in warnings[0]
    assert "2 initialised (critic/head, policy/objective_state/kl/coef)" in warnings[0]
    assert _snapshot(directory) == before
    reader.close()


def test_a_flipped_bit_is_caught_in_a_partial_restore_too(tmp_path):
    directory = str(tmp_path / "ckpt")
    _write_two_steps(directory)
    _flip_one_byte(os.path.join(directory, "2"))              # in the largest array, "w"
    fresh = {"w": jnp.zeros((64, 64), jnp.float32), "b": jnp.zeros((64,), jnp.float32),
             "step": jnp.asarray(0, jnp.int32)}
    reader = ck.Checkpointer(directory, on_mismatch="partial")
    step, state, _, _ = reader.restore_latest(ck.abstract_like(fresh), init_state=fresh)
    assert step == 1 and reader.corrupt_steps == [2]
    assert reader.last_restore.restored == ["step", "w"]
    assert reader.last_restore.initialised == ["b"]
    assert _equal(state["w"], _small_state(1.0)["w"]) and int(state["step"]) == 1
    assert np.array_equal(np.asarray(state["b"]), np.zeros(64))
    reader.close()


def test_a_second_quarantine_of_the_same_step_keeps_the_first(tmp_path):
    directory = str(tmp_path / "ckpt")
    writer = ck.Checkpointer(directory, keep=3, async_save=False)
    writer.save(1, _small_state(1.0))
    writer.close()
    contents = []
    for round_ in range(3):
        ckpt = ck.Checkpointer(directory, keep=3, async_save=False)
        ckpt.save(2, _small_state(2.0 + round_))
        ckpt.wait()
        _truncate_largest(os.path.join(directory, "2"))
        contents.append(_snapshot(os.path.join(directory, "2")))
        assert ckpt.restore_latest(ck.abstract_like(_small_state()))[0] == 1
        assert ckpt.corrupt_steps == [2]
        ckpt.close()
    assert sorted(os.listdir(directory)) == ["1", "2.corrupt", "2.corrupt.1", "2.corrupt.2"]
    for name, snap in zip(["2.corrupt", "2.corrupt.1", "2.corrupt.2"], contents):
        assert _snapshot(os.path.join(directory, name)) == snap


def _edit_json(path, edit):
    import json
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("item,edit", [
    ("extra", lambda d: d.update(iteration=7)),                       # the iteration counter
    ("data", lambda d: d.update(next_index=0)),                       # the data position
    ("extra", lambda d: d["rlx_state_digest"].update(identity={"model": "tiny"})),
    ("extra", lambda d: d["rlx_state_digest"]["tree"][0][1].append(1)),
], ids=["iteration", "data_position", "identity", "fingerprint"])
def test_tampered_metadata_is_detected_as_corruption(tmp_path, caplog, item, edit):
    directory = str(tmp_path / "ckpt")
    _write_two_steps(directory)
    _edit_json(os.path.join(directory, "2", item, "metadata"), edit)
    reader = ck.Checkpointer(directory, keep=3, identity=IDENTITY)
    with caplog.at_level(logging.WARNING, logger="rlx.checkpoint"):
        step, state, data_state, extra = reader.restore_latest(ck.abstract_like(_small_state()))
    assert (step, data_state, extra) == (1, {"next_index": 4}, {"iteration": 1})
    assert reader.corrupt_steps == [2] and sorted(os.listdir(directory)) == ["1", "2.corrupt"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "rlx.checkpoint"]
    assert len(warnings) == 1 and "differs from its digest" in warnings[0]
    reader.close()


def _legacy_save(directory, step, state, data_state=None, extra=None):
    """What the previous version of ``Checkpointer.save`` wrote: leaf digests only."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False, create=True))
    extra = {**(extra or {}), ck.DIGEST_KEY: {
        "digest": ck.state_digest(state), "dtypes": [str(x.dtype) for x in jax.tree.leaves(state)]}}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
        extra=ocp.args.JsonSave(extra)), force=True)
    manager.wait_until_finished()
    manager.close()


def test_old_format_checkpoints_restore_and_a_structure_change_is_still_refused(tmp_path):
    directory = str(tmp_path / "ckpt")
    _legacy_save(directory, 1, _small_state(1.0), {"next_index": 4}, {"iteration": 1})
    _legacy_save(directory, 2, _small_state(2.0), {"next_index": 8}, {"iteration": 2})
    before = _snapshot(directory)
    reader = ck.Checkpointer(directory, identity=IDENTITY)   # old steps carry no identity
    with pytest.raises(ck.CheckpointMismatch) as info:
        reader.restore_latest(ck.abstract_like(_changed_state()))
    assert info.value.added == ["value_head"] and info.value.removed == ["key"]
    assert [c[0] for c in info.value.changed] == ["b", "w"]
    assert _snapshot(directory) == before and reader.corrupt_steps == []
    step, state, data_state, extra = reader.restore_latest(ck.abstract_like(_small_state()))
    assert (step, data_state, extra) == (2, {"next_index": 8}, {"iteration": 2})
    assert _equal(state, _small_state(2.0)) and reader.last_restore.mode == "exact"
    # Their leaf digests still guard them.
    _flip_one_byte(os.path.join(directory, "2"))
    step, state, _, _ = reader.restore_latest(ck.abstract_like(_small_state()))
    assert step == 1 and _equal(state, _small_state(1.0)) and reader.corrupt_steps == [2]
    # A new save next to them is of the new format and restores as well.
    reader.save(3, _small_state(3.0), {"next_index": 12}, {"iteration": 3})
    reader.wait()
    assert reader.restore_latest(ck.abstract_like(_small_state()))[0] == 3
    reader.close()


def test_an_unreadable_step_costs_one_warning_line_not_tracebacks(tmp_path, capfd, caplog):
    directory = str(tmp_path / "ckpt")
    writer = ck.Checkpointer(directory, keep=3, async_save=False)
    writer.save(1, _small_state(1.0))
    writer.save(2, _small_state(2.0))
    writer.close()
    _truncate_largest(os.path.join(directory, "2"))
    capfd.readouterr()
    reader = ck.Checkpointer(directory, keep=3)
    with caplog.at_level(logging.WARNING):
        assert reader.restore_latest(ck.abstract_like(_small_state()))[0] == 1
    reader.close()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception ignored" not in out + err, err[:2000]
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(shown) == 1 and "\n" not in shown[0] and len(shown[0]) < 700, shown
    assert "TensorStore" not in shown[0]              # not the multi-line TensorStore spec
    # What orbax's abandoned coroutines print on failure goes through sys.unraisablehook,
    # which a read routes to the debug log and puts back afterwards.
    seen = []

    class Noisy:
        def __del__(self):
            raise RuntimeError("abandoned read")
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with ck._quiet():
            Noisy()
        assert seen == []
        Noisy()
        assert [str(u.exc_value) for u in seen] == ["abandoned read"]
    finally:
        sys.unraisablehook = previous
