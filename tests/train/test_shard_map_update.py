"""The update step under shard_map (explicit psums over the batch axes) equals plain
jit partitioning, on one device and on eight simulated devices."""

import os
import subprocess
import sys

import jax
import numpy as np
from test_engine import _trainer

from rlx.objectives import presets


def test_shard_map_update_equals_plain_jit_on_one_device(tmp_path):
    got = []
    for flag in (True, False):
        t = _trainer(tmp_path / str(flag), presets.r2vpo(), minibatches=2, shard_map_update=flag)
        t.iteration()
        got.append(jax.tree.leaves(jax.device_get(t.state.params)))
        t.close()
    for a, b in zip(*got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_shard_map_update_equals_plain_jit_on_eight_devices(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "shard_map_equal.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if "max_abs_diff" in ln]
    assert len(lines) == 3, out.stdout
    for line in lines:
        assert "devices=8" in line, line
        assert float(line.rsplit("=", 1)[1]) < 1e-5, line
