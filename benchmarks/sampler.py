"""Sampler throughput: generated tokens/s and time per decode step (not a test).

    .venv/bin/python benchmarks/sampler.py                       # tiny, CPU-sized batches
    .venv/bin/python benchmarks/sampler.py --preset qwen2.5-0.5b --prompts 2 --group 4 \
        --prompt-len 64 --new-tokens 16                          # ~0.5B, random weights
    .venv/bin/python benchmarks/sampler.py --vs_floor            # issue-16 prefill/decode
    .venv/bin/python benchmarks/sampler.py --vs_floor --rlx_root /tmp/rlx-old   # A/B

For every (preset, prompts P × group G, layout) it runs ``prefill`` and ``decode`` once to
compile, then ``--repeats`` timed times, and prints the median prefill time, decode time per
step, and generated tokens/s = P·G·steps / (prefill + decode). No stop tokens are set, so
every row decodes ``--new-tokens`` tokens. Layouts (``SamplerConfig.prefix_cache``):
shared (prompt KV once per prompt), repeat (one prefill, KV copied G times), reprefill
(the prompt repeated G times and prefilled P·G times).

On a GPU it also prints the memory-bandwidth floor of a decode step: bytes read per step
(weights + the whole KV buffer the reference attention reads) / measured bandwidth
(a large device-to-device copy).

``--vs_floor``: the issue-16 workload (``benchmarks/_workload.py``) timed as
``benchmarks/floor.py`` times it — prefill = ``generate(max_new_tokens=1)``, decode step
= (``generate(64)`` − ``generate(1)``) / 63, through the trainer's one-device mesh — as a
multiple of floor.py's floor (necessary FLOPs / this machine's measured matmul rates).
Each of ``--rounds`` rounds re-measures the floor right before timing rlx; every time is
the minimum over ``--repeats`` calls, as wall time and as this process's CPU time (on a
machine shared with other processes the CPU-time ratios are the stable ones: wall time
then includes waiting for a core). ``--rlx_root`` measures another checkout or
``git worktree`` (run both, alternating, for an A/B).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workload as wl  # noqa: E402  (imports rlx lazily: --rlx_root must come first)


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
    from rlx.sampling import SamplerConfig, decode, prefill, prepare
    from rlx.sampling.generate import device_inputs

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


def _min_time(fn, clock, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = clock()
        jax.block_until_ready(fn())
        times.append(clock() - t0)
    return min(times)


def vs_floor(rounds: int, repeats: int, layout: str) -> dict:
    """Prefill and decode step of the issue-16 workload as multiples of floor.py's floor."""
    import floor

    from rlx import sharding as sh
    from rlx.models import api
    from rlx.sampling import generate

    w = wl.Workload()
    cfg = w.model_config()
    graphdef, params = api.init(cfg, seed=0)
    tok = wl.char_tokenizer(w.vocab)
    _, probs = wl.problems(w)
    ids, mask = tok.batch_encode([q.prompt for q in probs[:w.prompts]], padding_side="left",
                                 add_bos=True)
    mesh, key = sh.make_mesh(), jax.random.key(1)

    def gen(n):
        config = w.sampler(tok.pad_id, max_new_tokens=n).replace(prefix_cache=layout)
        return lambda: generate(graphdef, params, ids, mask, key=key, config=config, mesh=mesh,
                                data_axis=sh.BATCH_AXES)

    class Rates(floor.Rates):       # floor.py's matmul loops, min over repeats, given clock
        clock = staticmethod(time.perf_counter)

        def _time(self, fn, args, flops_per_rep):
            reps = int(min(max(self.target / flops_per_rep, 1), 4096))
            run = jax.jit(lambda *a: fn(reps, *a))
            return flops_per_rep * reps / _min_time(lambda: run(*args), self.clock, self.repeats)

    g1, g_t = gen(1), gen(w.new_tokens)
    phases = floor.phases(cfg, w)
    out = {"wall": [], "cpu": []}
    for _ in range(rounds):
        for name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
            rates = Rates("float32", target_flops=2e9, repeats=repeats)
            rates.clock = clock
            f_pre, f_dec = rates.floor(*phases["prefill"]), rates.floor(*phases["decode_step"])
            t_1, t_t = _min_time(g1, clock, repeats), _min_time(g_t, clock, repeats)
            step = (t_t - t_1) / (w.new_tokens - 1)
            out[name].append(dict(prefill_ms=1e3 * t_1, floor_prefill_ms=1e3 * f_pre,
                                  prefill_x=t_1 / f_pre, step_ms=1e3 * step,
                                  floor_step_ms=1e3 * f_dec, decode_x=step / f_dec))
    return {name: {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
            | {"rounds": [(round(r["prefill_x"], 2), round(r["decode_x"], 2)) for r in rows]}
            for name, rows in out.items()}


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
    ap.add_argument("--vs_floor", action="store_true",
                    help="issue-16 workload: prefill / decode step as multiples of the floor")
    ap.add_argument("--rounds", type=int, default=3, help="--vs_floor: floor+rlx rounds")
    ap.add_argument("--rlx_root", default=None,
                    help="checkout or git worktree whose rlx is measured (default: this one)")
    args = ap.parse_args(argv)
    root = wl.use_checkout(args.rlx_root)
    if args.vs_floor:
        res = vs_floor(args.rounds, max(args.repeats, 5), args.layouts[0])
        print(json.dumps(dict(rlx=wl.describe_checkout(root), machine=wl.machine(),
                              layout=args.layouts[0], **res)))
        return
    from rlx.models import api
    from rlx.models.config import model_config

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
