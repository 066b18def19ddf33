"""Run logging: JSON-lines metrics, TensorBoard events, a console progress line,
periodic sample tables, and a PNG summary plot at the end.

Only process 0 writes. TensorBoard and the plot use optional packages
(``tensorboardX``, ``matplotlib``; the ``plot`` extra); without them those outputs
are skipped with one warning, never an error.
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

PLOT_KEYS = (("reward", "reward_mean"), ("held-out accuracy", "eval/accuracy"),
             ("KL(old‖new) (k3)", "ratio/approx_kl"), ("entropy", "entropy/mean"),
             ("response length", "response_length"))


def _scalar(v):
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    arr = np.asarray(v)
    if arr.size == 1:
        value = arr.reshape(()).item()
        return value
    return None


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
        if self.primary:
            os.makedirs(run_dir, exist_ok=True)
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
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
        for k, v in metrics.items():
            s = _scalar(v)
            if s is not None and not (isinstance(s, float) and math.isnan(s) and False):
                row[k] = s
        self.history.append(row)
        if not self.primary:
            return row
        self._jsonl.write(json.dumps(row, default=float) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
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
                parts.append(f"{label} {row[key]:.3g}")
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
        """PNG of reward / accuracy / KL / entropy / response length over steps."""
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
        for ax, (title, key) in zip(axes, PLOT_KEYS):
            pts = [(r["step"], r[key]) for r in self.history if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
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
