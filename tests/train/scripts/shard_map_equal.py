"""Runs one RL iteration per objective with the shard_map update and with plain jit on
the simulated devices of this process; prints the largest parameter difference."""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from test_engine import _trainer  # noqa: E402

from rlx.objectives import presets  # noqa: E402

out_dir = sys.argv[1]
# (GRPO's update is GDPO's with one reward component: gdpo covers the plain path)
cases = {"r2vpo": (presets.r2vpo(), {"minibatches": 2, "epochs": 2}),
         "bapo": (presets.bapo(), {"microbatches": 2}),
         "gdpo": (presets.gdpo(), {})}
for name, (obj, kw) in cases.items():
    params = []
    for flag in (True, False):
        t = _trainer(os.path.join(out_dir, f"{name}-{flag}"), obj, prompts_per_step=8,
                     shard_map_update=flag, **kw)
        t.iteration()
        params.append(jax.tree.leaves(jax.device_get(t.state.params)))
        t.close()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(*params))
    print(f"{name} devices={jax.device_count()} max_abs_diff={diff:.3e}", flush=True)
