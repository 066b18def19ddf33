"""Benchmark: memory of the RL start from a Hugging Face checkpoint on an FSDP mesh.

    .venv/bin/python benchmarks/sharded_load.py                  # qwen2.5-0.5b, 8 devices, fsdp=8
    .venv/bin/python benchmarks/sharded_load.py --baseline       # + the one-device path
    .venv/bin/python benchmarks/sharded_load.py --preset tiny --quick   # smoke test
    .venv/bin/python benchmarks/sharded_load.py --json runs/sharded_load.json

1. Writes a random checkpoint shaped like ``--preset`` (default ``qwen2.5-0.5b``: 494M
   parameters, tied embeddings) with ``rlx.models.convert.save_hf`` (what ``rlx convert
   rlx-to-hf`` calls) as ``--file_dtype`` safetensors (default bfloat16, Qwen2.5's own
   dtype), in shards of ``--shard_size``. Values are N(0, 0.02) drawn with NumPy.
2. In a fresh process with ``--devices`` simulated CPU devices and mesh (1, fsdp, 1), runs
   the recipe's start as ``rlx.recipes.prepare.train_rl`` does it: ``load_hf(mesh=)``
   (every device's slice read straight from the file), ``make_state`` (AdamW moments
   created in their shards by ``jit(tx.init, out_shardings=...)``), ``reference_params``
   (GRPO's KL reference, a sharded copy) and an ``RLTrainer`` built from them through
   ``sharding.hand_over`` (no second copy). Parameters are float32 master weights.
3. After each phase it accounts the live arrays' addressable shards per device
   (``jax.live_arrays()``; CPU devices report no ``memory_stats()``) and prints the
   largest device's bytes against the ideal 1/fsdp × (params + Adam moments +
   reference), and the process's peak host RSS (VmHWM, else ``resource.getrusage``; on CPU the
   device buffers live in host memory, so RSS = all devices' bytes + host overhead).

Live-array accounting samples between phases: a transient inside a phase (the host
blocks of the tensor being read, an XLA temporary) is not seen by it, but is by the RSS.
``--baseline`` also runs the path without a mesh (whole arrays on one device: load,
``state.create``, a reference copy) and reports that device's bytes before any
sharding, which is what a 7B float32 run needed on one device before this change.

Measured (2-core CPU shared with other jobs, 8 simulated devices, fsdp=8, bfloat16 file
of 0.988 GB, float32 parameters 1.976 GB + Adam 3.952 GB + reference 1.976 GB):
fullest device 0.247 GB after loading (0.250x the ideal 0.988 GB), 0.742 GB with the
moments, 0.989 GB with the reference and after building the RLTrainer (1.001x: the
replicated norm scales and biases); peak host RSS 8.46 GB = the 7.91 GB of all devices
+ 0.31 GB over the pre-load 0.23 GB (while loading: + the mmapped 1 GB file).
Baseline: 7.905 GB on one device before any sharding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--fsdp", type=int, default=None, help="default: --devices")
    ap.add_argument("--file_dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--shard_size", default="500MB")
    ap.add_argument("--dir", default=None, help="checkpoint folder (default: a temp dir)")
    ap.add_argument("--baseline", action="store_true", help="also the one-device path")
    ap.add_argument("--quick", action="store_true", help="tiny preset smoke test")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--_measure", choices=("sharded", "baseline"), default=None,
                    help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ------------------------------------------------------------------ the checkpoint
def write_checkpoint(folder: str, preset: str, file_dtype: str, shard_size: str) -> dict:
    import numpy as np

    from rlx.models import config as model_lib
    from rlx.models import convert

    cfg = model_lib.model_config(preset)
    rng = np.random.default_rng(0)
    params: dict = {}
    for spec in convert.tensor_specs(cfg):
        value = (np.ones(spec.shape, np.float32) if spec.path.endswith("/scale") else
                 rng.standard_normal(spec.shape, np.float32) * np.float32(0.02))
        node = params
        *parents, leaf = spec.path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    t0 = time.perf_counter()
    files = convert.save_hf(folder, cfg, params, dtype=file_dtype, shard_size=shard_size,
                            overwrite=True)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return {"preset": preset, "num_params": cfg.num_params, "file_dtype": file_dtype,
            "files": len(files), "file_bytes": size,
            "write_seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------ the measurement
def _per_device() -> dict:
    import jax

    used = {d: 0 for d in jax.devices()}
    seen = set()      # a shard's .data is itself a live array on the same buffer: count once
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            key = (shard.device.id, shard.data.unsafe_buffer_pointer())
            if key not in seen:
                seen.add(key)
                used[shard.device] += shard.data.nbytes
    return {str(d.id): n for d, n in used.items()}


def _rss() -> int:
    """Peak resident set of this process (VmHWM: unlike ru_maxrss it does not carry
    the parent's peak over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _nbytes(tree) -> int:
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(folder: str, mode: str, fsdp: int) -> dict:
    import jax

    from rlx import sharding as sh
    from rlx.models import convert
    from rlx.objectives import presets
    from rlx.recipes import prepare
    from rlx.train import optim
    from rlx.train import state as state_lib

    jax.devices()                             # backend up before the first RSS sample
    rss0 = _rss()
    phases = []

    def record(name, t0):
        per = _per_device()
        phases.append({"phase": name, "seconds": time.perf_counter() - t0,
                       "max_device_bytes": max(per.values()), "per_device": per,
                       "peak_rss_bytes": _rss()})

    tx = optim.constant(1e-6)
    objective = presets.grpo()                # k3 KL: reads a reference
    t0 = time.perf_counter()
    if mode == "sharded":
        mesh = sh.make_mesh((1, fsdp, 1), devices=jax.devices()[:fsdp])
        cfg, graphdef, params = convert.load_hf(folder, mesh=mesh)
        record("load_hf(mesh=) params", t0)
        t0 = time.perf_counter()
        state = prepare.make_state(params, tx, mesh, seed=0,
                                   objective_state=objective.init())
        record("+ Adam moments (jit tx.init, out_shardings)", t0)
        t0 = time.perf_counter()
        ref = prepare.reference_params(objective, params, mesh)
        record("+ KL reference (sharded copy)", t0)
        t0 = time.perf_counter()
        trainer = _trainer(graphdef, state, tx, objective, ref, mesh)
        del state, ref, params
        record("RLTrainer built (hand_over: moved, not copied)", t0)
        state_bytes = _nbytes(trainer.state.params), _nbytes(trainer.state.opt_state)
        ref_bytes = _nbytes(trainer.ref_params)
    else:
        cfg, graphdef, params = convert.load_hf(folder)
        record("load_hf() params on one device", t0)
        t0 = time.perf_counter()
        state = state_lib.create(params, tx, seed=0, objective_state=objective.init())
        record("+ Adam moments (state.create)", t0)
        t0 = time.perf_counter()
        ref = jax.tree.map(lambda x: x.copy(), params)
        record("+ KL reference (copy)", t0)
        state_bytes = _nbytes(state.params), _nbytes(state.opt_state)
        ref_bytes = _nbytes(ref)
    params_b, opt_b = state_bytes
    total = params_b + opt_b + ref_bytes
    return {"mode": mode, "fsdp": fsdp if mode == "sharded" else 1,
            "params_bytes": params_b, "opt_bytes": opt_b, "ref_bytes": ref_bytes,
            "ideal_per_device": total / (fsdp if mode == "sharded" else 1),
            "rss_before_bytes": rss0, "phases": phases}


def _trainer(graphdef, state, tx, objective, ref, mesh):
    """An RLTrainer around the sharded state (tokenizer and rewards are never called)."""
    from rlx import sharding as sh
    from rlx.sampling.config import SamplerConfig
    from rlx.tasks import Problem
    from rlx.train import rl
    from rlx.train.data import ProblemStream

    class _Unused:
        eos_id, pad_id, bos_id, vocab_size, stop_ids = 0, 0, None, 1, (0,)

    run_dir = tempfile.mkdtemp(prefix="sharded_load_")
    return rl.RLTrainer(
        graphdef=graphdef, state=sh.hand_over(state), tx=tx, objective=objective,
        tokenizer=_Unused(), stream=ProblemStream([Problem(prompt="x", answer="y")]),
        reward_pool=_Unused(), sampler=SamplerConfig(num_generations=8, max_new_tokens=16),
        config=rl.RLConfig(steps=1, prompts_per_step=8), run_dir=run_dir, mesh=mesh,
        ref_params=sh.hand_over(ref))


# ------------------------------------------------------------------------ report
def _gb(n: float) -> str:
    return f"{n / 1e9:7.3f} GB"


def report(result: dict) -> list[str]:
    lines = [f"--- {result['mode']} (fsdp={result['fsdp']}): params {_gb(result['params_bytes'])}"
             f", Adam moments {_gb(result['opt_bytes'])}, reference {_gb(result['ref_bytes'])}"
             f"; ideal per device {_gb(result['ideal_per_device'])}",
             f"{'phase':52s} {'max device':>11s} {'x ideal':>8s} {'peak RSS':>11s} {'s':>6s}"]
    for ph in result["phases"]:
        lines.append(f"{ph['phase']:52s} {_gb(ph['max_device_bytes'])} "
                     f"{ph['max_device_bytes'] / result['ideal_per_device']:8.3f} "
                     f"{_gb(ph['peak_rss_bytes'])} {ph['seconds']:6.1f}")
    last = result["phases"][-1]
    devices = sum(last["per_device"].values())
    lines.append(f"host RSS before loading {_gb(result['rss_before_bytes'])}; peak RSS "
                 f"{_gb(last['peak_rss_bytes'])} = all devices {_gb(devices)} + host "
                 f"overhead {_gb(last['peak_rss_bytes'] - devices - result['rss_before_bytes'])}"
                 " (above the pre-load RSS)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    fsdp = args.fsdp or args.devices
    if args._measure:
        print(json.dumps(measure(args.dir, args._measure, fsdp)))
        return 0
    preset = "tiny" if args.quick else args.preset
    folder = args.dir or tempfile.mkdtemp(prefix="sharded_load_ckpt_")
    written = write_checkpoint(folder, preset, args.file_dtype,
                               "20KB" if args.quick else args.shard_size)
    print(f"checkpoint {folder}: {preset}, {written['num_params']:,} parameters, "
          f"{written['files']} {written['file_dtype']} safetensors file(s), "
          f"{_gb(written['file_bytes'])}, written in {written['write_seconds']:.1f} s")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    results = []
    for mode in ["sharded"] + (["baseline"] if args.baseline else []):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--dir", folder,
                              "--devices", str(args.devices), "--fsdp", str(fsdp),
                              "--_measure", mode], env=env, capture_output=True, text=True,
                             cwd=ROOT)
        if out.returncode:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return out.returncode
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print("\n".join(report(results[-1])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": written, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
