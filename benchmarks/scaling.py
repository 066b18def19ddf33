"""Scaling table: ``RLTrainer.iteration()`` time and memory against G, prompt length,
completion length and model width (issue 16 item 3), with the cost model next to it.

    .venv/bin/python benchmarks/scaling.py                     # the full sweep (11 min on 2 cores)
    .venv/bin/python benchmarks/scaling.py --json runs/scaling.json
    .venv/bin/python benchmarks/scaling.py --axes G prompt     # some axes only
    .venv/bin/python benchmarks/scaling.py --quick             # tiny sizes, a smoke test

Sweep. One axis is varied at a time around a base workload (``_workload.Workload``: the
peer model, 3.18M-parameter Qwen2 shape L=4, D=256, F=768, H=4, K=2, V=128, float32,
GRPO without KL, one AdamW step per iteration, inline arithmetic rewards), with a base
batch small enough for a 2-core CPU: P = 2 prompts × G = 8, Sp = 128 prompt tokens,
T = 64 new tokens. Axes: G ∈ {4, 8, 16, 32}; Sp ∈ {32, 128, 512, 1024};
T ∈ {64, 256, 1024}; width ×{1, 2, 4} (``Workload.wider``: D, F and the query heads
scaled, K = 2 and the depth kept; 3.2M, 12M, 48M parameters). No stop token is set,
so every row decodes all T tokens (prompts are exactly Sp tokens, the buckets are
exactly Sp and T).

Two configurations per point, each a real ``RLTrainer`` in a fresh subprocess (so its
peak RSS is its own):
  A "nothing shared": naive update (G rows ``[prompt | c_g]``), sampler
    ``prefix_cache="repeat"`` (one prefill, prompt KV copied into each of the G rows);
  B "everything shared": ``shared_prefix_update=True`` (Prefix Grouper: one packed row
    ``[prompt | c_1 | … | c_G]`` per prompt), ``prefix_cache="shared"`` (prompt KV
    stored once per prompt, the G rows read it).
The sampler layout only changes ``time/generate`` and the update layout only
``time/update``, so the phase split of A and B gives both comparisons; ``iteration``
A vs B is the two together. In A, ``rlx.sampling.generate`` is also called directly
with ``prefix_cache="reprefill"`` (the naive baseline: the prompt repeated G times and
prefilled P·G times), min of ``--gen_repeats`` calls after one untimed call.
Timed: ``--warmup`` iterations (the first compiles) then ``--iters``; the table shows
the minimum (least disturbed by the other load on the machine) of the wall time of
``time/generate``, ``time/update``, ``time/host`` (tokenization, text decoding,
rewards, transfers) and ``time/iteration``, and of the iteration's process CPU time
(all threads; the VM has 2 cores, so CPU > wall means both were used). The 1-minute
load average is recorded before each subprocess.

Memory, per point:
  - XLA's compiled ``memory_analysis()`` (jax ≥ 0.4: ``jax.stages.Compiled``; best
    effort, may be None on a backend) of the programs the iteration really ran: the
    update (``rlx.train.update.jit_update``) and the sampler's ``prefill`` and
    ``decode``. Their arguments are captured on the first call and re-lowered after
    the timing (the jit cache hands back the same executable). Figure = argument +
    output + temp − aliased bytes (what the program needs resident at once); the
    sampler figure is the larger of prefill and decode. ``peak_memory_in_bytes`` and
    the parts are in the JSON.
  - the subprocess's peak RSS (``resource.getrusage``: the whole process, jax runtime
    and compile included; ≈ 0.4 GB of it is the floor of any point).
  - the KV cache bytes the layout needs (analytic): repeat 2·L·K·Dh·4·B·(Sp + T),
    shared 2·L·K·Dh·4·(P·Sp + B·T).

Cost model (matmul FLOPs from ``floor.py``'s ``forward_parts``/``phases``; N_mat the
non-embedding weights, B = P·G rows, S = Sp + T; fwd+bwd = 3 × fwd):
  linear    projections/MLP: 2·N_mat per token forwarded — prefill P·Sp tokens, decode
            B tokens per step × T steps, update 3 × B·S tokens (naive) or
            3 × P·(Sp + G·T) (packed); KV cache bytes ∝ L·K·Dh·tokens cached; the
            decode's weight reads ∝ N per step (the memory-bound part at small B);
            everything in G at fixed Sp, T.
  quadratic attention: 4·L·H·Dh per (query, key) pair — prefill P·Sp²/2 (causal
            necessary; the reference backend computes the full Sp² square), decode
            B·(Sp + T) per step (the whole cache is read every step: Sp·T + T² over a
            rollout, quadratic in T), update 3 × B·S²/2 naive; packed necessary
            3 × P·(Sp²/2 + G·(T·Sp + T²/2)) but the reference (jnp, masked) attention
            computes the dense square 3 × P·(Sp + G·T)² — quadratic in G·T; the
            update's [B, H, S, S] (naive) or [P, H, Sp+G·T, Sp+G·T] (packed) scores
            are materialised, so its memory has the same quadratic term.
  width     N_mat ∝ D·(D + F) ∝ width² (attention FLOPs ∝ H·Dh ∝ width).
The exponent table fits log time = a + b·log(axis) over each axis (least squares)
and sets next to it the same fit of the model's FLOPs: "necessary" (floor.py's count)
and "computed" (what the reference attention backend really multiplies: dense
squares). Time follows FLOPs only where the phase is compute-bound; decode at a few
rows is dispatch- and weight-read-bound (slope below the FLOP model).

Where each should pay off:
  - shared prompt KV ("shared" vs "repeat"): prefill is once per prompt in both; the
    saving is the G−1 copies of the prompt KV (memory (G−1)/G·B·Sp of the cache slots)
    and the copy/read bandwidth: larger G and longer prompts relative to completions.
    Against "reprefill" (the naive baseline) it also saves (G−1)/G of prefill FLOPs,
    which grow with G·Sp² per prompt.
  - Prefix Grouper update: the prompt is forwarded once per group instead of G times:
    projection/MLP tokens B·S → P·(Sp + G·T), a saving of (G−1)·P·Sp tokens, large
    when G is large and Sp ≫ T. With dense (reference) attention over the packed row
    its attention cost P·(Sp + G·T)² exceeds the naive B·S² once G·T is large against
    Sp (it grows as G², naive as G), so it loses at large G with long completions and
    short prompts unless a block-sparse kernel skips the cross-completion blocks
    (``attention_backend="block_sparse"``, accelerators).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workload as wl  # noqa: E402

HERE = os.path.abspath(__file__)
_MARK = "SCALING-RESULT "

# axis name -> (label, values); "width" values are factors of the base widths
AXES_FULL = {"G": [4, 8, 16, 32], "prompt": [32, 128, 512, 1024],
             "completion": [64, 256, 1024], "width": [1, 2, 4]}
AXES_QUICK = {"G": [2, 4], "prompt": [8, 16], "completion": [8, 16], "width": [1, 2]}
LABELS = {"G": "G", "prompt": "Sp", "completion": "T", "width": "width ×"}
CONFIGS = {"A": dict(shared_prefix_update=False, prefix_cache="repeat"),
           "B": dict(shared_prefix_update=True, prefix_cache="shared")}


@dataclasses.dataclass(frozen=True)
class Point(wl.Workload):
    """A ``Workload`` with the sampler's prefix-cache layout as a field."""

    prefix_cache: str = "shared"

    def sampler(self, pad_id: int, max_new_tokens: int | None = None):
        return super().sampler(pad_id, max_new_tokens).replace(prefix_cache=self.prefix_cache)


def base_workload(quick: bool) -> Point:
    if quick:       # one layer, D=32: compile time is what a smoke test pays
        return Point(prompts=1, group=2, prompt_tokens=8, new_tokens=8, hidden=32,
                     intermediate=64, layers=1, heads=2, kv_heads=1)
    return Point(prompts=2, group=8, prompt_tokens=128, new_tokens=64)


def at(base: Point, axis: str, value: int) -> Point:
    if axis == "G":
        return dataclasses.replace(base, group=value)
    if axis == "prompt":
        return dataclasses.replace(base, prompt_tokens=value)
    if axis == "completion":
        return dataclasses.replace(base, new_tokens=value)
    if axis == "width":
        return base if value == 1 else base.wider(value)
    raise ValueError(axis)


def sweep(base: Point, axes: dict) -> list[tuple[str, int, Point]]:
    return [(axis, v, at(base, axis, v)) for axis, values in axes.items() for v in values]


# ------------------------------------------------------------------ cost model
def model_flops(w: Point) -> dict:
    """Matmul FLOPs per phase: necessary (floor.py) and computed (reference backend)."""
    import floor

    cfg = w.model_config()
    p, g, sp, t = w.prompts, w.group, w.prompt_tokens, w.new_tokens
    b, s = w.rows, sp + t
    fw = lambda *a: sum(x.flops for x in floor.forward_parts(cfg, *a))  # noqa: E731
    out = {}
    for packed in (False, True):
        ph = floor.phases(cfg, dataclasses.replace(w, shared_prefix_update=packed))
        need = {k: m * sum(x.flops for x in parts) for k, (parts, m) in ph.items()}
        out["prefill"] = need["prefill"]
        out["decode"] = (t - 1) * need["decode_step"]
        out["update_packed" if packed else "update_naive"] = need["update"]
    # what the reference (dense, masked) attention multiplies: full squares, whole cache
    out["c_prefill"] = fw(p * sp, p, p, sp, sp, p * sp * sp)
    out["c_reprefill"] = fw(b * sp, b, b, sp, sp, b * sp * sp)
    out["c_decode"] = (t - 1) * fw(b, b, b, 1, s, b * s)
    out["c_update_naive"] = 3 * fw(b * s, b * t, b, s, s, b * s * s)
    sk = sp + g * t
    out["c_update_packed"] = 3 * fw(p * sk, b * t, p, sk, sk, p * sk * sk)
    for pre in ("", "c_"):
        out[pre + "generate"] = out[pre + "prefill"] + out[pre + "decode"]
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    out["kv_repeat_bytes"] = kv * b * s
    out["kv_shared_bytes"] = kv * (p * sp + b * t)
    return out


# ---------------------------------------------------------- program capture
def _sds(x):
    import jax

    if isinstance(x, jax.Array):      # uncommitted arrays lower without a sharding
        committed = getattr(x, "committed", getattr(x, "_committed", True))
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=x.sharding if committed else None,
                                    weak_type=getattr(x, "weak_type", False))
    return x


class Programs:
    """Records the arguments (as shapes) of the first call of each compiled program
    the iteration runs, to ask XLA for its memory and cost analysis afterwards."""

    def __init__(self):
        self.calls: dict = {}

    def _record(self, name, fn, args, kwargs):
        import jax

        if name not in self.calls:
            self.calls[name] = (fn, (args[0],) + tuple(jax.tree.map(_sds, args[1:])),
                                {k: jax.tree.map(_sds, v) for k, v in kwargs.items()})

    @contextlib.contextmanager
    def capture(self):
        import importlib

        gen_mod = importlib.import_module("rlx.sampling.generate")  # the module, not the fn
        from rlx.train import update as update_lib

        saved = (gen_mod.prefill, gen_mod.decode, update_lib.jit_update)

        def wrap(name, fn):
            def call(*args, **kwargs):
                cfg = kwargs.get("config")
                tag = f"{name}:{cfg.prefix_cache}" if cfg is not None else name
                self._record(tag, fn, args, kwargs)
                return fn(*args, **kwargs)
            return call

        def jit_update(*args, **kwargs):
            return wrap("update", saved[2](*args, **kwargs))

        gen_mod.prefill, gen_mod.decode = wrap("prefill", saved[0]), wrap("decode", saved[1])
        update_lib.jit_update = jit_update
        try:
            yield self
        finally:
            gen_mod.prefill, gen_mod.decode, update_lib.jit_update = saved

    def analyse(self) -> dict:
        out = {}
        for name, (fn, args, kwargs) in self.calls.items():
            try:
                compiled = fn.lower(*args, **kwargs).compile()
                mem = compiled.memory_analysis()
                cost = compiled.cost_analysis()
            except Exception as e:  # noqa: BLE001 - best effort per backend
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            rec = {}
            if mem is not None:
                for f in ("argument_size_in_bytes", "output_size_in_bytes",
                          "temp_size_in_bytes", "alias_size_in_bytes",
                          "peak_memory_in_bytes", "generated_code_size_in_bytes"):
                    rec[f] = getattr(mem, f, None)
                rec["bytes"] = (rec["argument_size_in_bytes"] + rec["output_size_in_bytes"]
                                + rec["temp_size_in_bytes"] - rec["alias_size_in_bytes"])
            if isinstance(cost, list):
                cost = cost[0] if cost else None
            if cost:
                rec["xla_flops"] = cost.get("flops")
            out[name] = rec
        return out


# ------------------------------------------------------------------ one run
def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_config(w: Point, warmup: int, iters: int, gen_repeats: int, reprefill: bool) -> dict:
    """Times one trainer (in this process) and analyses its programs."""
    import jax

    from rlx import sharding as sh
    from rlx.sampling import generate

    programs = Programs()
    with programs.capture():
        built = wl.build_trainer(w, steps=warmup + iters)
        try:
            tr = built.trainer
            inner = tr.iteration

            def iteration():          # adds the iteration's process CPU time
                c0 = time.process_time()
                m = inner()
                m["cpu/iteration"] = time.process_time() - c0
                return m

            tr.iteration = iteration
            times = wl.time_iterations(tr, warmup=warmup, iters=iters)
            keys = times.keys() + ["cpu/iteration"]
            out = {"min": {k: min(times.values(k)) for k in keys if times.values(k)},
                   "timed": times.timed, "compiles_after_first": len(times.compiles_after),
                   "response_length": times.median("response_length")}
            if reprefill:
                tok = built.tokenizer
                ids, mask = tok.batch_encode([q.prompt for q in built.problems[:w.prompts]],
                                             padding_side="left", add_bos=True)
                cfg = w.sampler(tok.pad_id).replace(prefix_cache="reprefill")
                key = jax.random.key(1)

                def gen():
                    return generate(tr.graphdef, tr.state.params, ids, mask, key=key,
                                    config=cfg, mesh=tr.mesh, data_axis=sh.BATCH_AXES)

                jax.block_until_ready(gen())
                walls = []
                for _ in range(gen_repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(gen())
                    walls.append(time.perf_counter() - t0)
                out["generate_reprefill_min"] = min(walls)
        finally:
            built.close()
    out["programs"] = programs.analyse()
    return out


def _child(spec: dict) -> None:
    wl.use_checkout(spec.get("rlx_root"))
    w = Point(**spec["workload"])
    res = run_config(w, spec["warmup"], spec["iters"], spec["gen_repeats"], spec["reprefill"])
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(_MARK + json.dumps(res), flush=True)


def run_point(w: Point, cfg_name: str, args) -> dict:
    """One configuration of one point: in a subprocess (default) or in this process."""
    w = dataclasses.replace(w, **CONFIGS[cfg_name])
    spec = dict(workload=dataclasses.asdict(w), warmup=args.warmup, iters=args.iters,
                gen_repeats=args.gen_repeats, reprefill=cfg_name == "A" and args.reprefill,
                rlx_root=args.rlx_root)
    load = _loadavg()
    t0 = time.perf_counter()
    if args.in_process:
        res = run_config(w, spec["warmup"], spec["iters"], spec["gen_repeats"],
                         spec["reprefill"])
        res["peak_rss_bytes"] = None   # a shared process: not this point's own
    else:
        proc = subprocess.run([sys.executable, HERE, "--_child", json.dumps(spec)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout)[-3000:]
            raise RuntimeError(f"point {w} config {cfg_name} failed (rc {proc.returncode}):"
                               f"\n{tail}")
        res = json.loads(lines[-1][len(_MARK):])
    res["load_before"] = load
    res["seconds"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------- report
def _fit(xs, ys) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
           if x and y is not None and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def _mem(prog: dict, *names) -> float | None:
    vals = [prog.get(n, {}).get("bytes") for n in names]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def summarise(axis: str, value: int, w: Point, res: dict) -> dict:
    a, b = res["A"], res["B"]
    ma, mb = a["min"], b["min"]
    pa, pb = a["programs"], b["programs"]
    return {
        "axis": axis, "value": value, "rows": w.rows, "S": w.prompt_tokens + w.new_tokens,
        "params_M": w.model_config().num_params / 1e6,
        "gen_repeat": ma.get("time/generate"), "gen_shared": mb.get("time/generate"),
        "gen_reprefill": a.get("generate_reprefill_min"),
        "upd_naive": ma.get("time/update"), "upd_packed": mb.get("time/update"),
        "host_A": ma.get("time/host"), "host_B": mb.get("time/host"),
        "iter_A": ma.get("time/iteration"), "iter_B": mb.get("time/iteration"),
        "cpu_A": ma.get("cpu/iteration"), "cpu_B": mb.get("cpu/iteration"),
        "mem_upd_naive": _mem(pa, "update"), "mem_upd_packed": _mem(pb, "update"),
        "mem_smp_repeat": _mem(pa, "prefill:repeat", "decode:repeat"),
        "mem_smp_shared": _mem(pb, "prefill:shared", "decode:shared"),
        "mem_smp_reprefill": _mem(pa, "prefill:reprefill", "decode:reprefill"),
        "xla_flops_upd_naive": pa.get("update", {}).get("xla_flops"),
        "xla_flops_upd_packed": pb.get("update", {}).get("xla_flops"),
        "rss_A": a.get("peak_rss_bytes"), "rss_B": b.get("peak_rss_bytes"),
        "load": [a.get("load_before"), b.get("load_before")],
        "response_length": [a.get("response_length"), b.get("response_length")],
        "compiles_after_first": [a.get("compiles_after_first"), b.get("compiles_after_first")],
        "model": model_flops(w),
        "errors": {c: _short_error(res[c]["error"]) for c in res if res[c].get("error")},
    }


def _short_error(text: str) -> str:
    import re

    m = re.search(r"Out of memory allocating (\d+) bytes", text)
    if m:
        return f"out of memory (an allocation of {int(m.group(1)) / 2**30:.1f} GiB)"
    return text.strip().splitlines()[-1][:200] if text.strip() else "failed"


def _s(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _mb(x):
    return "—" if x is None else f"{x / 2**20:.0f}" if x >= 2**20 * 10 else f"{x / 2**20:.1f}"


def _ratio(x, y):
    return "—" if x is None or not y else f"{x / y:.2f}"


def time_table(rows: list[dict]) -> list[str]:
    out = ["| axis | value | rows B | S | gen repeat s | gen shared s | repeat/shared | "
           "gen reprefill s | upd naive s | upd packed s | naive/packed | host A/B s | "
           "iter A s | iter B s | A/B | CPU A/B s | load |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        load = "/".join(_s(x, 1) for x in r["load"])
        out.append(
            f"| {LABELS[r['axis']]} | {r['value']} | {r['rows']} | {r['S']} | "
            f"{_s(r['gen_repeat'])} | {_s(r['gen_shared'])} | "
            f"{_ratio(r['gen_repeat'], r['gen_shared'])} | {_s(r['gen_reprefill'])} | "
            f"{_s(r['upd_naive'])} | {_s(r['upd_packed'])} | "
            f"{_ratio(r['upd_naive'], r['upd_packed'])} | "
            f"{_s(r['host_A'], 3)}/{_s(r['host_B'], 3)} | {_s(r['iter_A'])} | "
            f"{_s(r['iter_B'])} | {_ratio(r['iter_A'], r['iter_B'])} | "
            f"{_s(r['cpu_A'], 1)}/{_s(r['cpu_B'], 1)} | {load} |")
    return out


def memory_table(rows: list[dict]) -> list[str]:
    out = ["| axis | value | params M | update naive MB | update packed MB | "
           "sampler repeat MB | sampler shared MB | sampler reprefill MB | "
           "KV repeat MB | KV shared MB | peak RSS A/B MB | "
           "XLA update GFLOP naive/packed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["model"]
        xf = "/".join("—" if x is None else f"{x / 1e9:.1f}"
                      for x in (r["xla_flops_upd_naive"], r["xla_flops_upd_packed"]))
        out.append(
            f"| {LABELS[r['axis']]} | {r['value']} | {r['params_M']:.1f} | "
            f"{_mb(r['mem_upd_naive'])} | {_mb(r['mem_upd_packed'])} | "
            f"{_mb(r['mem_smp_repeat'])} | {_mb(r['mem_smp_shared'])} | "
            f"{_mb(r['mem_smp_reprefill'])} | {_mb(m['kv_repeat_bytes'])} | "
            f"{_mb(m['kv_shared_bytes'])} | {_mb(r['rss_A'])}/{_mb(r['rss_B'])} | {xf} |")
    return out


# measured key -> (necessary-FLOP model key, computed-FLOP model key)
SERIES = [
    ("iteration A (naive + repeat)", "iter_A", ("generate", "update_naive"),
     ("c_generate", "c_update_naive")),
    ("iteration B (packed + shared)", "iter_B", ("generate", "update_packed"),
     ("c_generate", "c_update_packed")),
    ("generate, repeat KV", "gen_repeat", ("generate",), ("c_generate",)),
    ("generate, shared KV", "gen_shared", ("generate",), ("c_generate",)),
    ("generate, reprefill (direct)", "gen_reprefill", ("generate",),
     ("c_reprefill", "c_decode")),
    ("update, naive", "upd_naive", ("update_naive",), ("c_update_naive",)),
    ("update, packed", "upd_packed", ("update_packed",), ("c_update_packed",)),
]
MEM_SERIES = [("memory, update naive", "mem_upd_naive"),
              ("memory, update packed", "mem_upd_packed"),
              ("memory, sampler repeat", "mem_smp_repeat", "kv_repeat_bytes"),
              ("memory, sampler shared", "mem_smp_shared", "kv_shared_bytes")]


def exponents(rows: list[dict]) -> tuple[list[str], dict]:
    axes = list(dict.fromkeys(r["axis"] for r in rows))
    by_axis = {a: [r for r in rows if r["axis"] == a] for a in axes}
    head = "| quantity | " + " | ".join(
        f"{LABELS[a]}: measured / FLOP model necessary / computed" for a in axes) + " |"
    out = [head, "|---|" + "---:|" * len(axes)]
    fits = {}

    def cell(vals):
        return " / ".join(_s(v) for v in vals)

    for label, key, need, comp in SERIES:
        cells = []
        for a in axes:
            rs = by_axis[a]
            xs = [r["value"] for r in rs]
            meas = _fit(xs, [r[key] for r in rs])
            n = _fit(xs, [sum(r["model"][k] for k in need) for r in rs])
            c = _fit(xs, [sum(r["model"][k] for k in comp) for r in rs])
            fits[(label, a)] = (meas, n, c)
            cells.append(cell((meas, n, c)))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, key, *model in MEM_SERIES:
        cells = []
        for a in axes:
            rs = by_axis[a]
            xs = [r["value"] for r in rs]
            meas = _fit(xs, [r[key] for r in rs])
            kv = _fit(xs, [r["model"][model[0]] for r in rs]) if model else None
            fits[(label, a)] = (meas, kv, None)
            cells.append(_s(meas) + (f" / KV bytes {_s(kv)}" if model else ""))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out, {f"{k[0]} | {k[1]}": v for k, v in fits.items()}


# ----------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and axes (a smoke test)")
    ap.add_argument("--axes", nargs="+", choices=list(AXES_FULL), default=None)
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations (the first compiles)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 2; quick 1)")
    ap.add_argument("--gen_repeats", type=int, default=None,
                    help="timed direct reprefill generate calls (default 1)")
    ap.add_argument("--reprefill", action=argparse.BooleanOptionalAction, default=None,
                    help="also time prefix_cache='reprefill' directly (default: on; quick: off)")
    ap.add_argument("--in_process", action="store_true",
                    help="run every point in this process (no per-point peak RSS; faster)")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--rlx_root", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.iters is None:
        args.iters = 1 if args.quick else 2
    if args.gen_repeats is None:
        args.gen_repeats = 1
    if args.reprefill is None:
        args.reprefill = not args.quick
    if args.warmup < 1 or args.iters < 1 or args.gen_repeats < 1:
        ap.error("--warmup, --iters and --gen_repeats must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._child is not None:
        _child(json.loads(args._child))
        return {}
    root = os.path.abspath(args.rlx_root or wl.REPO)
    if "rlx" not in sys.modules:        # (a test may have imported this rlx already)
        wl.use_checkout(root)
    import jax

    axes_all = AXES_QUICK if args.quick else AXES_FULL
    axes = {a: axes_all[a] for a in (args.axes or axes_all)}
    base = base_workload(args.quick)
    started = datetime.datetime.now(datetime.timezone.utc)
    header = [f"rlx: {wl.describe_checkout(root)}", f"machine: {wl.machine()}",
              f"python {platform.python_version()}, jax {jax.__version__}",
              f"started {started:%Y-%m-%d %H:%M} UTC, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
              f"base: {base.describe().split('; update layout')[0]}",
              f"{args.warmup} warm-up + {args.iters} timed iterations per configuration "
              f"(min shown); reprefill: min of {args.gen_repeats} direct calls"]
    print("\n".join(header), flush=True)

    cache: dict = {}
    rows = []
    for axis, value, w in sweep(base, axes):
        key = dataclasses.astuple(w)
        if key not in cache:
            res = {}
            for cfg_name in CONFIGS:
                try:
                    res[cfg_name] = run_point(w, cfg_name, args)
                except Exception as e:  # noqa: BLE001 - one failed point must not end the sweep
                    print(f"  {LABELS[axis]}={value} {cfg_name} FAILED: {e}", flush=True)
                    res[cfg_name] = {"error": str(e)[-2000:], "min": {}, "programs": {}}
            cache[key] = res
            print(f"  {LABELS[axis]}={value}: A {res['A']['min'].get('time/iteration', 0):.2f}"
                  f" s, B {res['B']['min'].get('time/iteration', 0):.2f} s "
                  f"({res['A'].get('seconds', 0) + res['B'].get('seconds', 0):.0f} s)", flush=True)
        rows.append(summarise(axis, value, w, cache[key]))

    ended = datetime.datetime.now(datetime.timezone.utc)
    ex_lines, fits = exponents(rows)
    print(f"\nfinished {ended:%H:%M} UTC ({(ended - started).total_seconds() / 60:.1f} min), "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n### Time (min over timed iterations; A = naive update + repeat KV, "
          "B = Prefix Grouper update + shared KV)\n")
    print("\n".join(time_table(rows)))
    print("\n### Memory (XLA compiled memory_analysis: argument + output + temp − alias; "
          "KV = analytic cache bytes; peak RSS of the subprocess)\n")
    print("\n".join(memory_table(rows)))
    for r in rows:
        for c, e in r["errors"].items():
            print(f"failed: {LABELS[r['axis']]}={r['value']} config {c}: {e}")
    print("\n### Growth exponents (log-log slope over the axis)\n")
    print("\n".join(ex_lines))
    out = {"header": header, "started": started.isoformat(), "ended": ended.isoformat(),
           "jax": jax.__version__, "base": dataclasses.asdict(base), "axes": axes,
           "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
           "rows": rows, "fits": fits,
           "raw": [{"workload": list(k), **v} for k, v in cache.items()]}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
