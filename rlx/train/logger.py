"""Run logging: JSON-lines metrics, TensorBoard events, a console progress line,
periodic sample tables, and a PNG summary plot at the end.

Only process 0 writes. TensorBoard and the plot use optional packages
(``tensorboardX``, ``matplotlib``; the ``plot`` extra); without them those outputs
are skipped with one warning, never an error.

``metrics.jsonl`` is strict JSON: a NaN or ±inf metric is written as ``null``, the
row's ``nonfinite_metrics`` says how many of its metrics were so, and the first
non-finite value of each metric name is reported with one warning.

A run killed while writing a row leaves a torn last line; the next run on the same
directory moves that fragment to ``metrics.jsonl.torn`` (appended, never dropped)
before appending, so every line of ``metrics.jsonl`` stays a complete JSON object.
(The torn row's step is redone anyway: a step is logged before it is checkpointed.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Iterable, Sequence

import jax
import numpy as np

log = logging.getLogger("rlx.logger")

# KL to the reference policy, first name found: the engine's measured KL of the sampled
# tokens ("kl/ref"), else the ``kl_penalty`` regularizer's default metric ("kl/mean").
# (The old‖new ratio KL ``ratio/approx_kl`` is ~1e-13 on-policy and says nothing.)
REF_KL_KEYS = ("kl/ref", "kl/mean")
# (panel title, metric names tried in order, text shown when none was logged)
PLOT_KEYS = (("reward", ("reward_mean",), "no reward logged"),
             ("held-out accuracy", ("eval/accuracy",), "no evaluation in this run"),
             ("KL(π‖π_ref)", REF_KL_KEYS, "no reference KL in this run"),
             ("entropy", ("entropy/mean",), "no entropy logged"),
             ("response length", ("response_length",), "no lengths logged"))
NONFINITE_KEY = "nonfinite_metrics"


def _scalar(v):
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    arr = np.asarray(v)
    if arr.size == 1:
        value = arr.reshape(()).item()
        return value
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _set_aside_torn_line(path: str) -> int:
    """Moves an unterminated last line of ``path`` to ``path + ".torn"``; returns its
    length in bytes (0 when the file ends with a newline or does not exist)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        block, start = 1 << 16, size
        while start > 0:                 # find the last newline
            start = max(0, start - block)
            f.seek(start)
            chunk = f.read(min(block, size - start))
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                start += cut + 1
                break
        f.seek(start)
        fragment = f.read()
        with open(path + ".torn", "ab") as torn:
            torn.write(fragment + b"\n")
        f.truncate(start)
    log.warning("%s ended with a torn line (%d bytes, from a run stopped while writing "
                "it); moved to %s.torn", path, len(fragment), path)
    return len(fragment)


class RunLogger:
    def __init__(self, run_dir: str, *, total_steps: int, tensorboard: bool = True,
                 console: bool = True, stream=None):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.console = console
        self.stream = stream or sys.stdout
        self.primary = jax.process_index() == 0
        self._start = time.monotonic()
        self._tb = None
        self.history: list[dict] = []
        self.nonfinite: dict[str, int] = {}      # metric name -> rows where it was NaN/inf
        self.plotted: dict[str, str | None] = {}  # plot panel -> metric shown (see plot)
        self.torn = 0                              # bytes of a torn last line set aside
        if self.primary:
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "metrics.jsonl")
            self.torn = _set_aside_torn_line(path)
            self._jsonl = open(path, "a", encoding="utf-8")
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                    self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
                except ImportError:
                    log.warning("tensorboardX not installed: no TensorBoard events "
                                "(pip install 'rlx[plot]')")

    def log(self, step: int, metrics: dict) -> dict:
        """Writes one record; returns the scalarised metrics."""
        row = {"step": int(step), "time": round(time.monotonic() - self._start, 3)}
        bad = 0
        for k, v in metrics.items():
            s = _scalar(v)
            if isinstance(s, float) and not math.isfinite(s):
                bad += 1
                self.nonfinite[k] = self.nonfinite.get(k, 0) + 1
                if self.nonfinite[k] == 1 and self.primary:
                    log.warning("metric %r is %s at step %d (recorded as null in "
                                "metrics.jsonl; counted in %r)", k, s, step, NONFINITE_KEY)
                row[k] = None
            elif s is not None:
                row[k] = s
        row[NONFINITE_KEY] = bad
        self.history.append(row)
        if not self.primary:
            return row
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", NONFINITE_KEY):
                    self._tb.add_scalar(k, v, step)
        if self.console:
            self._progress(step, row)
        return row

    def _progress(self, step: int, row: dict) -> None:
        elapsed = time.monotonic() - self._start
        done = max(step, 1)
        eta = elapsed / done * max(self.total_steps - step, 0)
        width = 20
        filled = int(width * min(max(step, 0) / max(self.total_steps, 1), 1.0))
        bar = "#" * filled + "." * (width - filled)
        parts = [f"[{bar}] {step}/{self.total_steps}"]
        for key, label in (("reward_mean", "reward"), ("eval/accuracy", "acc"),
                           ("tokens_per_s", "tok/s"), ("sft_loss", "loss")):
            if key in row:
                value = row[key]
                parts.append(f"{label} {value:.3g}" if isinstance(value, (int, float))
                             else f"{label} {'n/a' if value is None else value}")
        parts.append(f"ETA {eta:,.0f}s" if step > 0 else "warm-up")
        print(" | ".join(parts), file=self.stream, flush=True)

    def samples(self, step: int, prompts: Sequence[str], completions: Sequence[str],
                rewards: Iterable[float], limit: int = 4) -> str:
        """Prints (and appends to samples.md) a small table of completions."""
        lines = [f"\nsamples at step {step}", "| reward | prompt | completion |",
                 "|---:|---|---|"]
        for p, c, r in list(zip(prompts, completions, rewards))[:limit]:
            clean = lambda s: s.replace("\n", "⏎").replace("|", "¦")[:80]  # noqa: E731
            lines.append(f"| {float(r):.2f} | {clean(p)} | {clean(c)} |")
        text = "\n".join(lines)
        if self.primary:
            with open(os.path.join(self.run_dir, "samples.md"), "a", encoding="utf-8") as f:
                f.write(text + "\n")
            if self.console:
                print(text, file=self.stream, flush=True)
        return text

    def plot(self, path: str | None = None) -> str | None:
        """PNG of reward / accuracy / KL to the reference / entropy / response length.

        Each panel plots the first of its metric names that was logged (``PLOT_KEYS``)
        and otherwise says that the run has none. :attr:`plotted` records, per panel
        title, the metric name used (None for an empty panel).
        """
        if not self.primary:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib not installed: no plot (pip install 'rlx[plot]')")
            return None
        path = path or os.path.join(self.run_dir, "curves.png")
        fig, axes = plt.subplots(1, len(PLOT_KEYS), figsize=(4 * len(PLOT_KEYS), 3))
        self.plotted = {}
        for ax, (title, keys, missing) in zip(axes, PLOT_KEYS):
            key = next((k for k in keys if any(_number(r.get(k)) for r in self.history)), None)
            self.plotted[title] = key
            if key is None:
                ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes,
                        color="gray")
            else:
                xs, ys = zip(*[(r["step"], r[key]) for r in self.history if _number(r.get(key))])
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
                ax.legend(loc="best", fontsize="small")
            ax.set_title(title)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.primary:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
