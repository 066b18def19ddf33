"""Sampler throughput: generated tokens/s and time per decode step (not a test).

    .venv/bin/python benchmarks/sampler.py                       # tiny, CPU-sized batches
    .venv/bin/python benchmarks/sampler.py --preset qwen2.5-0.5b --prompts 2 --group 4 \
        --prompt-len 64 --new-tokens 16                          # ~0.5B, random weights

For every (preset, prompts P × group G, layout) it runs ``prefill`` and ``decode`` once to
compile, then ``--repeats`` timed times, and prints the median prefill time, decode time per
step, and generated tokens/s = P·G·steps / (prefill + decode). No stop tokens are set, so
every row decodes ``--new-tokens`` tokens. Layouts (``SamplerConfig.prefix_cache``):
shared (prompt KV once per prompt), repeat (one prefill, KV copied G times), reprefill
(the prompt repeated G times and prefilled P·G times).

On a GPU it also prints the memory-bandwidth floor of a decode step: bytes read per step
(weights + the whole KV buffer the reference attention reads) / measured bandwidth
(a large device-to-device copy).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlx.models import api
from rlx.models.config import model_config
from rlx.sampling import SamplerConfig, decode, prefill, prepare
from rlx.sampling.generate import device_inputs


def measured_bandwidth() -> float:
    """Bytes/s of a 1 GiB copy (read + write) on the default device."""
    x = jnp.ones((256 * 1024 * 1024,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / min(times)


def kv_bytes(cfg, p, g, sp, t, layout) -> int:
    """Size of the group KV cache (= the KV bytes attention reads per decode step)."""
    per_slot = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * \
        jnp.dtype(cfg.dtype).itemsize
    slots = p * sp + p * g * t if layout == "shared" else p * g * (sp + t)
    return slots * per_slot


def bytes_per_step(cfg, params, p, g, sp, t, layout) -> int:
    """Weights + the KV slots attention reads in one decode step."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    return weights + kv_bytes(cfg, p, g, sp, t, layout)


def run_one(cfg, graphdef, params, p, g, prompt_len, new_tokens, layout, repeats, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, (p, prompt_len)).astype(np.int32)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, p)
    mask = np.arange(prompt_len)[None] < lengths[:, None]
    config = SamplerConfig(max_new_tokens=new_tokens, num_generations=g, prefix_cache=layout)
    batch = prepare(ids, mask, config, vocab_size=cfg.vocab_size)
    x = device_inputs(batch)
    key = jax.random.key(seed)
    static = dict(config=batch.config, mesh=None, data_axis="data")
    pre_args = (x["prompts"], x["prompt_mask"], key, x["prompt_index"], x["forced"],
                x["forced_lengths"])

    def once():
        t0 = time.perf_counter()
        cache, state = prefill(graphdef, params, *pre_args, **static)
        jax.block_until_ready((cache, state))
        t1 = time.perf_counter()
        out, cache = decode(graphdef, params, cache, state, x["prompts"], x["prompt_mask"],
                            key, x["prompt_index"], x["forced"], x["forced_lengths"],
                            jnp.int32(new_tokens), **static)
        jax.block_until_ready(out)
        return t1 - t0, time.perf_counter() - t1, int(out.decode_steps)

    t = time.perf_counter()
    once()
    compile_s = time.perf_counter() - t
    runs = [once() for _ in range(repeats)]
    pre = statistics.median(r[0] for r in runs)
    dec = statistics.median(r[1] for r in runs)
    steps = runs[0][2]
    # token 0 comes from the prefill; decode runs steps - 1 forwards
    step_s = dec / max(steps - 1, 1)
    return dict(prefill_s=pre, decode_s=dec, steps=steps, step_ms=1e3 * step_s,
                tok_s=p * g * steps / (pre + dec), compile_s=compile_s,
                sp=batch.prompts.shape[1], t=batch.config.max_new_tokens)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default=None, help="param/compute dtype (default: bfloat16 "
                    "on GPU/TPU, float32 on CPU)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--group", type=int, nargs="+", default=[8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layouts", nargs="+", default=["shared", "repeat", "reprefill"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    cfg = model_config(args.preset, dtype=dtype, param_dtype=dtype)
    graphdef, params = api.init(cfg, seed=0)
    bw = measured_bandwidth() if backend != "cpu" else None
    print(f"# {args.preset} ({cfg.num_params / 1e6:.1f}M params, {dtype}, random weights) "
          f"on {jax.devices()[0].device_kind} [{backend}], {jax.device_count()} device(s)")
    print(f"# prompt length ≤ {args.prompt_len} (lengths U[{args.prompt_len // 2}, "
          f"{args.prompt_len}]), {args.new_tokens} new tokens, no stop tokens, "
          f"median of {args.repeats}")
    if bw:
        print(f"# measured bandwidth {bw / 1e9:.0f} GB/s")
    head = (f"{'P×G':>8} {'rows':>5} {'layout':>9} {'Sp':>5} {'T':>5} {'prefill ms':>11} "
            f"{'step ms':>9} {'tokens/s':>10} {'KV MiB':>8} {'compile s':>10}")
    if bw:
        head += f" {'floor ms':>9} {'step/floor':>10}"
    print(head)
    for p in args.prompts:
        for g in args.group:
            for layout in args.layouts:
                r = run_one(cfg, graphdef, params, p, g, args.prompt_len, args.new_tokens,
                            layout, args.repeats)
                line = (f"{f'{p}×{g}':>8} {p * g:>5} {layout:>9} {r['sp']:>5} {r['t']:>5} "
                        f"{1e3 * r['prefill_s']:>11.2f} {r['step_ms']:>9.3f} "
                        f"{r['tok_s']:>10.1f} "
                        f"{kv_bytes(cfg, p, g, r['sp'], r['t'], layout) / 2**20:>8.2f} "
                        f"{r['compile_s']:>10.1f}")
                if bw:
                    floor = bytes_per_step(cfg, params, p, g, r["sp"], r["t"], layout) / bw
                    line += f" {1e3 * floor:>9.3f} {r['step_ms'] / (1e3 * floor):>10.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
