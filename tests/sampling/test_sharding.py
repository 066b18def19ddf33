"""generate on 8 simulated CPU devices gives the rollout of one device.

Runs in a subprocess: the device count is fixed when JAX initialises, and this test
session's conftest has already imported JAX with one CPU device.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from rlx.models import api
    from rlx.models.config import model_config
    from rlx.sampling import SamplerConfig, generate

    assert jax.device_count() == 8, jax.devices()
    graphdef, params = api.init(model_config("tiny"), seed=0)
    ids = np.array([[11, 12, 13, 0, 0], [21, 22, 23, 24, 25], [31, 0, 0, 0, 0]], np.int32)
    config = SamplerConfig(max_new_tokens=12, num_generations=2, temperature=0.9,
                           top_p=0.95, stop_token_ids=(7, 8, 9),
                           return_policy_logprobs=True)
    key = jax.random.key(42)
    forced = np.zeros((6, 1), np.int32) + 5
    kw = dict(key=key, config=config, forced_prefix=forced,
              forced_lengths=np.array([1, 0, 1, 0, 1, 0]))
    want = generate(graphdef, params, ids, ids > 0, **kw)

    def check(out, name):
        assert len(out.completion_ids.sharding.device_set) == 8, name
        np.testing.assert_array_equal(out.completion_ids, want.completion_ids, err_msg=name)
        np.testing.assert_array_equal(out.lengths, want.lengths, err_msg=name)
        np.testing.assert_array_equal(out.forced, want.forced, err_msg=name)
        np.testing.assert_allclose(out.sampling_logprobs, want.sampling_logprobs, atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(out.policy_logprobs, want.policy_logprobs, atol=1e-5,
                                   err_msg=name)

    devices = np.array(jax.devices())
    check(generate(graphdef, params, ids, ids > 0, mesh=Mesh(devices, ("data",)), **kw),
          "auto 8")
    check(generate(graphdef, params, ids, ids > 0, mesh=jax.make_mesh((8,), ("data",)), **kw),
          "explicit 8")
    mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
    def place(x):  # caller-sharded params: last dim over "model"
        spec = [None] * (x.ndim - 1) + ["model"] if x.ndim == 2 else []
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
    sharded = jax.tree.map(place, params)
    check(generate(graphdef, sharded, ids, ids > 0, mesh=mesh, data_axis="data", **kw),
          "data 4 x model 2")
    print("OK")
""")


def test_eight_simulated_devices_match_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")
