"""The mesh module: partition rules, divisibility fallback, and identical results on
1 device and on 8 simulated devices with (data, fsdp, tensor) = 8×1×1, 2×2×2, 1×4×2."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlx import sharding as sh
from rlx.models import api, config


def test_rules_map_parameter_paths_to_specs():
    mesh = sh.make_mesh()
    shape = (64, 64)
    assert sh.spec_for("trunk/layers/0/attn/q_proj/kernel", shape, mesh) == P("fsdp", "tensor")
    assert sh.spec_for("trunk/layers/3/mlp/down_proj/kernel/value", shape, mesh) == \
        P("tensor", "fsdp")
    assert all(a is None for a in sh.spec_for("trunk/final_norm/scale", (64,), mesh))
    assert sh.spec_for("opt/0/mu/unknown_thing", (3,), mesh) == P()


def test_every_policy_parameter_matches_a_rule():
    _, params = api.abstract_init(config.model_config("qwen2.5-0.5b"))
    matched = []
    for path in api.param_paths(params):
        matched.append(any(__import__("re").search(pat, path) for pat, _ in sh.PARAM_RULES))
    assert all(matched)


def test_non_divisible_dimension_is_replicated():
    devices = np.array(jax.devices() * 1)
    mesh = jax.sharding.Mesh(devices.reshape(1, 1, 1), sh.AXES)
    assert sh.spec_for("attn/q_proj/kernel", (7, 5), mesh) == P("fsdp", "tensor")


def test_make_mesh_rejects_wrong_device_counts():
    with pytest.raises(ValueError, match="needs 4 devices"):
        sh.make_mesh((2, 2, 1))
    with pytest.raises(ValueError, match="does not match axes"):
        sh.make_mesh((1, 1))


def test_shard_batch_places_rows_over_the_batch_axes():
    mesh = sh.make_mesh()
    placed = sh.shard_batch({"x": np.zeros((3, 2)), "n": np.float32(1)}, mesh)
    assert placed["x"].shape == (3, 2)
    assert placed["x"].sharding.spec == P(sh.BATCH_AXES, None)


_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_default_matmul_precision", "highest")
    from rlx import sharding as sh
    from rlx.models import api, config
    from rlx.objectives import presets
    from rlx.objectives.types import PolicyBatch
    from rlx.train import state as st, steps
    from rlx.train.batches import RolloutBatch, SFTBatch, make_sequences
    cfg = config.model_config("tiny", vocab_size=64)
    graphdef, params = api.init(cfg, seed=0)
    tx = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 64, (8, 12)); mask = np.ones((8, 12), bool); mask[:2, :3] = False
    loss = np.zeros((8, 12), np.float32); loss[:, 6:] = 1
    sft = SFTBatch(seq=make_sequences(toks, mask), loss_mask=jnp.asarray(loss))
    t = 6; cm = jnp.asarray(mask[:, 6:], jnp.float32)
    pb = PolicyBatch(mask=cm, old_logp=-jnp.ones((8, t)) * cm,
                     advantages=jnp.asarray(rng.normal(size=(8, t)), jnp.float32) * cm)
    rb = RolloutBatch(seq=sft.seq, policy=pb)
    obj = presets.grpo(kl_coef=0.0)
    out = {}
    for shape in [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]:
        mesh = sh.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
        s0 = st.create(params, tx, objective_state=obj.init())
        shs = sh.state_shardings(s0, mesh); s0 = sh.place(s0, shs)
        b1 = sh.shard_batch(sft, mesh)
        f1 = steps.jit_step(steps.make_sft_step(graphdef, tx), mesh, shs, b1)
        s1, m1 = f1(s0, b1)
        b2 = sh.shard_batch(rb, mesh)
        f2 = steps.jit_step(steps.make_policy_step(graphdef, tx, obj), mesh, shs, b2)
        s2, m2 = f2(s1, b2)
        leaves = jax.tree.leaves(jax.device_get(s2.params))
        out[str(shape)] = np.concatenate([np.ravel(x) for x in leaves])
        out["loss" + str(shape)] = np.array([m1["sft_loss"], m2["loss"]])
    np.savez(os.environ["OUT"], **out)
""")


def test_results_agree_on_one_and_eight_simulated_devices(tmp_path):
    script = tmp_path / "mesh.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "out.npz"
    env = {**os.environ, "OUT": str(out)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = np.load(out)
    base = res["(1, 1, 1)"]
    for shape in ["(8, 1, 1)", "(2, 2, 2)", "(1, 4, 2)"]:
        np.testing.assert_allclose(res[shape], base, atol=2e-6, rtol=1e-5, err_msg=shape)
        np.testing.assert_allclose(res["loss" + shape], res["loss(1, 1, 1)"], rtol=1e-5)
