"""The peer GRPO workload, built from rlx's own parts (shared by rl_step.py and floor.py).

Workload (issue 16): a Qwen2-shaped policy of about 3M parameters (4 layers, D = 256,
SwiGLU 768, 4 query / 2 key-value heads, q/k/v bias, tied embeddings, V = 128),
P = 16 prompts × G = 8 rollouts, prompts of exactly 32 tokens (BOS + 31 characters),
exactly 64 new tokens (no stop token is set, so every row runs all 64 decode steps),
float32, GRPO without KL (no reference policy), one AdamW step per iteration
(``minibatches`` = 1), an arithmetic task from ``rlx.tasks`` scored by its own reward
spec through ``rlx.rewards.RewardPool``.

The trainer is a real ``rlx.train.rl.RLTrainer`` and the timed call is
``RLTrainer.iteration()`` itself: prompt tokenization, sampling, text decoding,
rewards, host/device transfers, log-prob passes and the update are all inside.

Which rlx is measured: ``use_checkout(root)`` puts ``root`` (a checkout or a
``git worktree`` of another commit) first on ``sys.path`` and maps ``rlx_kernels``
to ``root/kernels``, for this process and for the reward workers it starts. It must
run before anything imports rlx; that is why rlx is imported inside functions here.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import platform
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PREAMBLE = "Work out the sum or difference, column by column: "


# ------------------------------------------------------------------- which rlx
def use_checkout(root: str | None = None) -> str:
    """Imports rlx (and rlx_kernels) from ``root`` (default: this file's checkout)."""
    root = os.path.abspath(root or REPO)
    if not os.path.isfile(os.path.join(root, "rlx", "__init__.py")):
        raise SystemExit(f"--rlx_root {root!r}: no rlx/ package there")
    if "rlx" in sys.modules:
        raise RuntimeError("use_checkout must run before rlx is imported")
    paths = [root]
    kernels = os.path.join(root, "kernels")
    if os.path.isdir(kernels):          # installed as rlx_kernels (package-dir mapping)
        link_dir = tempfile.mkdtemp(prefix="rlx-kernels-")
        atexit.register(shutil.rmtree, link_dir, ignore_errors=True)
        os.symlink(kernels, os.path.join(link_dir, "rlx_kernels"))
        paths.insert(0, link_dir)
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join(
        paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return root


def describe_checkout(root: str) -> str:
    """'<path> @ <commit>[+dirty]' of the rlx that is imported."""
    import rlx

    def git(*args):
        try:
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    dirty = "+dirty" if git("status", "--porcelain", "--", "rlx", "kernels") else ""
    return f"{os.path.dirname(os.path.dirname(os.path.abspath(rlx.__file__)))} @ {commit}{dirty}"


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    return (f"{platform.node()} · {platform.processor() or platform.machine()} · "
            f"{os.cpu_count()} CPUs · jax {jax.__version__} · {jax.default_backend()} "
            f"{dev.device_kind} ×{jax.device_count()}")


# -------------------------------------------------------------------- workload
@dataclasses.dataclass(frozen=True)
class Workload:
    """Sizes of one benchmark run (defaults: the peer workload of issue 16)."""

    prompts: int = 16
    group: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 64
    hidden: int = 256
    intermediate: int = 768
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 128
    dtype: str = "float32"
    learning_rate: float = 1e-5
    minibatches: int = 1
    shared_prefix_update: bool = False
    reward_backend: str = "inline"

    def quick(self) -> "Workload":
        """Smoke-test sizes (seconds per iteration on a loaded 2-core machine)."""
        return dataclasses.replace(self, prompts=4, group=4, prompt_tokens=16, new_tokens=16,
                                   hidden=64, intermediate=192, layers=2)

    def wider(self, factor: int = 2) -> "Workload":
        """The same depth with every width ×factor (about factor² the parameters)."""
        return dataclasses.replace(self, hidden=self.hidden * factor,
                                   intermediate=self.intermediate * factor,
                                   heads=self.heads * factor)

    @property
    def rows(self) -> int:
        return self.prompts * self.group

    def model_config(self):
        from rlx.models.config import model_config

        return model_config("qwen2.5-0.5b", vocab_size=self.vocab, hidden_size=self.hidden,
                            intermediate_size=self.intermediate, num_layers=self.layers,
                            num_heads=self.heads, num_kv_heads=self.kv_heads,
                            dtype=self.dtype, param_dtype=self.dtype,
                            max_position_embeddings=max(1024, 2 * (self.prompt_tokens +
                                                                   self.new_tokens)))

    def sampler(self, pad_id: int, max_new_tokens: int | None = None):
        from rlx.sampling.config import SamplerConfig

        return SamplerConfig(max_new_tokens=max_new_tokens or self.new_tokens,
                             num_generations=self.group, temperature=1.0,
                             stop_token_ids=(), pad_id=pad_id,
                             prompt_buckets=(self.prompt_tokens,),
                             completion_buckets=(self.new_tokens,))

    def describe(self) -> str:
        cfg = self.model_config()
        layout = "Prefix Grouper (packed)" if self.shared_prefix_update else "naive (G rows)"
        return (f"{self.prompts} prompts × G={self.group}, {self.prompt_tokens} prompt + "
                f"{self.new_tokens} new tokens, {self.dtype}; model {cfg.num_params / 1e6:.2f}M "
                f"params (L={cfg.num_layers}, D={cfg.hidden_size}, F={cfg.intermediate_size}, "
                f"H={cfg.num_heads}, K={cfg.num_kv_heads}, V={cfg.vocab_size}); GRPO, no KL, "
                f"{self.minibatches} AdamW step(s)/iteration; update layout {layout}; "
                f"rewards {self.reward_backend}")


def char_tokenizer(vocab: int = 128):
    """pad 0, bos 1, eos 2, printable ASCII from 3; ids ≥ 98 are unused (decode to '')."""
    from rlx.data.tokenizer import Tokenizer

    chars = string.printable[:95]          # digits, letters, punctuation, space
    if vocab < len(chars) + 3:
        raise ValueError(f"vocab={vocab}: need at least {len(chars) + 3} ids")

    class CharTokenizer(Tokenizer):
        _to_id = {c: i + 3 for i, c in enumerate(chars)}

        @property
        def vocab_size(self):
            return vocab

        @property
        def bos_id(self):
            return 1

        @property
        def eos_id(self):
            return 2

        @property
        def pad_id(self):
            return 0

        def _encode(self, text):
            return [self._to_id.get(c, self._to_id["?"]) for c in text]

        def decode(self, ids, *, skip_special=True):
            return "".join(chars[i - 3] if 3 <= i < 3 + len(chars) else
                           ("" if skip_special else f"<{i}>") for i in map(int, ids))

    return CharTokenizer()


def problems(workload: Workload, n: int = 512):
    """Arithmetic problems whose prompts are exactly ``prompt_tokens`` tokens with BOS
    (a fixed preamble, cut from the left, in front of e.g. ``"47+38="``)."""
    from rlx.tasks import ArithmeticTask, Problem

    task = ArithmeticTask(digits=(1, 2), operators=("+", "-"))
    width = workload.prompt_tokens - 1
    out = []
    for q in task.train(n, seed=0):
        fill = (_PREAMBLE * (1 + width // len(_PREAMBLE)))[:max(width - len(q.prompt), 0)]
        out.append(Problem(prompt=(fill + q.prompt)[-width:], answer=q.answer, meta=q.meta))
    return task, out


@dataclasses.dataclass
class Built:
    trainer: object
    pool: object
    tokenizer: object
    problems: list
    run_dir: str

    def close(self):
        for fn in (self.trainer.close, self.pool.close):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - cleanup must not hide the results
                print(f"(cleanup: {type(e).__name__}: {e})", file=sys.stderr)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def build_trainer(workload: Workload, steps: int = 1000) -> Built:
    """A real ``RLTrainer`` for ``workload`` (random weights, no checkpoints/eval)."""
    import jax  # noqa: F401  (rlx needs it initialised; keeps import order explicit)

    from rlx.models import api
    from rlx.objectives import presets
    from rlx.rewards.pool import RewardPool
    from rlx.train import optim, rl
    from rlx.train import state as state_lib
    from rlx.train.data import ProblemStream

    tok = char_tokenizer(workload.vocab)
    task, probs = problems(workload)
    graphdef, params = api.init(workload.model_config(), seed=0)
    objective = presets.grpo(kl_coef=0.0)
    tx = optim.optimizer(learning_rate=workload.learning_rate)
    state = state_lib.create(params, tx, objective_state=objective.init())
    wanted = dict(steps=steps, prompts_per_step=workload.prompts, epochs=1,
                  minibatches=workload.minibatches, microbatches=1, dynamic_sampling=False,
                  eval_every=0, log_samples_every=0,
                  shared_prefix_update=workload.shared_prefix_update,
                  checkpoint_every=None, checkpoint_minutes=None)
    known = {f.name for f in dataclasses.fields(rl.RLConfig)}
    needed = ["prompts_per_step", "minibatches"] + \
        (["shared_prefix_update"] if workload.shared_prefix_update else [])
    missing = [k for k in needed if k not in known]
    if missing:
        raise SystemExit(f"this rlx's RLConfig has no {missing}")
    config = rl.RLConfig(**{k: v for k, v in wanted.items() if k in known})
    pool = RewardPool(task.reward_spec(), backend=workload.reward_backend)
    run_dir = tempfile.mkdtemp(prefix="rlx-bench-")
    trainer = rl.RLTrainer(graphdef=graphdef, state=state, tx=tx, objective=objective,
                           tokenizer=tok, stream=ProblemStream(probs, seed=0),
                           reward_pool=pool, sampler=workload.sampler(tok.pad_id),
                           config=config, run_dir=run_dir, ref_params=None)
    return Built(trainer=trainer, pool=pool, tokenizer=tok, problems=probs, run_dir=run_dir)


# ------------------------------------------------------------ compile counter
class CompileCounter:
    """Counts XLA compilations (jax.monitoring's backend-compile event, one per
    executable built: a jit cache miss, persistent-cache hits included)."""

    def __init__(self):
        import jax.monitoring as monitoring

        self._monitoring = monitoring
        self.names: list[str] = []
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.names.append(str(kwargs.get("fun_name", "?")))

    @property
    def count(self) -> int:
        return len(self.names)

    def close(self):
        unregister = getattr(self._monitoring, "unregister_event_duration_listener", None)
        if unregister is not None:
            unregister(self._on_event)


# --------------------------------------------------------------------- timing
@dataclasses.dataclass
class IterationTimes:
    """Per-iteration records of ``RLTrainer.iteration()``."""

    warmup: list[dict]
    timed: list[dict]
    compiles_first: int            # compilations during the first iteration
    compiles_after: list[str]      # functions compiled after the first iteration

    def keys(self) -> list[str]:
        """Every time/* and perf/* key any timed iteration reported, plus the wall time."""
        seen = []
        for rec in self.timed:
            for k in rec:
                if k not in seen:
                    seen.append(k)
        phases = sorted(k for k in seen if k.startswith("time/") and k != "time/iteration")
        tail = [k for k in ("time/iteration", "wall/iteration()") if k in seen]
        return phases + tail + sorted(k for k in seen if k.startswith("perf/"))

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.timed if key in r]
        return statistics.median(values) if values else None

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.timed if key in r]


def _numbers(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if k.startswith("_"):
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def time_iterations(trainer, *, warmup: int, iters: int) -> IterationTimes:
    """Runs ``warmup`` + ``iters`` iterations; the first one compiles."""
    counter = CompileCounter()
    records, first = [], None
    try:
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            metrics = trainer.iteration()
            wall = time.perf_counter() - t0
            rec = _numbers(metrics)
            rec["wall/iteration()"] = wall
            records.append(rec)
            if i == 0:
                first = counter.count
    finally:
        counter.close()
    return IterationTimes(warmup=records[:warmup], timed=records[warmup:],
                          compiles_first=first or 0, compiles_after=counter.names[first or 0:])


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (result blocked on) after one untimed call."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
