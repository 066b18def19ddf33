"""RunLogger: JSON lines (strict: non-finite values as null, counted), progress line,
samples table, plot (KL panel: KL to the reference, never the on-policy ratio KL)."""

import io
import json
import logging
import math
import os

import jax.numpy as jnp
import numpy as np

from rlx.train.logger import NONFINITE_KEY, RunLogger

KL_PANEL = "KL(π‖π_ref)"


def _strict_rows(path):
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def test_logger_writes_jsonl_progress_samples_and_plot(tmp_path):
    out = io.StringIO()
    logger = RunLogger(str(tmp_path), total_steps=4, stream=out)
    logger.log(-3, {"sft_loss": 1.5})                     # warm-up phases log negative steps
    for step in range(1, 5):
        logger.log(step, {"reward_mean": step / 4, "entropy/mean": 1.0, "ratio/approx_kl": 0.01,
                          "response_length": 3.0, "eval/accuracy": 0.5, "not_scalar": [1, 2]})
    logger.samples(4, ["1+1="], ["2"], [1.0])
    path = logger.plot()
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [-3, 1, 2, 3, 4]
    assert "not_scalar" not in rows[-1] and rows[-1]["reward_mean"] == 1.0
    assert all(r[NONFINITE_KEY] == 0 for r in rows)
    text = out.getvalue()
    assert "[....................] -3/4" in text and "[####################] 4/4" in text
    assert "| 1.00 | 1+1= | 2 |" in open(tmp_path / "samples.md").read()
    assert path and os.path.getsize(path) > 1000
    assert os.path.isdir(tmp_path / "tensorboard")


def test_nonfinite_metrics_are_written_as_null_counted_and_warned_once(tmp_path, caplog):
    out = io.StringIO()
    logger = RunLogger(str(tmp_path), total_steps=3, stream=out, tensorboard=False)
    with caplog.at_level(logging.WARNING, logger="rlx.logger"):
        logger.log(1, {"reward_mean": float("nan"), "loss/total": np.float32("inf"),
                       "adv/min": jnp.asarray(-jnp.inf), "kl/mean": jnp.asarray([jnp.nan]),
                       "fine": 0.5, "count": 3})
        logger.log(2, {"reward_mean": math.nan, "loss/total": 1.0, "fine": 0.25, "count": 4})
        logger.log(3, {"reward_mean": 0.75, "fine": np.float64(0.125)})
    logger.close()
    rows = _strict_rows(tmp_path / "metrics.jsonl")       # every line is strict JSON
    assert [r[NONFINITE_KEY] for r in rows] == [4, 1, 0]
    assert rows[0]["reward_mean"] is None and rows[0]["loss/total"] is None
    assert rows[0]["adv/min"] is None and rows[0]["kl/mean"] is None
    assert rows[0]["fine"] == 0.5 and rows[0]["count"] == 3
    assert rows[1]["reward_mean"] is None and rows[1]["loss/total"] == 1.0
    assert rows[2]["reward_mean"] == 0.75 and rows[2]["fine"] == 0.125
    assert logger.nonfinite == {"reward_mean": 2, "loss/total": 1, "adv/min": 1, "kl/mean": 1}
    warnings = [r.getMessage() for r in caplog.records if r.name == "rlx.logger"]
    assert len(warnings) == 4                              # once per metric name
    assert sum("'reward_mean'" in w for w in warnings) == 1
    assert any("'loss/total' is inf" in w for w in warnings)
    assert "reward n/a" in out.getvalue().splitlines()[0]  # the progress line survives NaN


def test_kl_panel_shows_kl_to_the_reference_or_says_there_is_none(tmp_path):
    def plotted(rows):
        logger = RunLogger(str(tmp_path), total_steps=3, console=False, tensorboard=False)
        for step, row in enumerate(rows, 1):
            logger.log(step, row)
        assert logger.plot(str(tmp_path / f"curves{len(rows)}.png"))
        logger.close()
        return logger.plotted

    on_policy = {"ratio/approx_kl": 1e-13, "reward_mean": 0.5}
    assert plotted([on_policy] * 2)[KL_PANEL] is None      # "no reference KL in this run"
    got = plotted([{**on_policy, "kl/mean": 0.02, "kl/coef": 0.04}] * 3)
    assert got[KL_PANEL] == "kl/mean" and got["reward"] == "reward_mean"
    got = plotted([{**on_policy, "kl/mean": 0.02, "kl/ref": 0.03}] * 4)
    assert got[KL_PANEL] == "kl/ref"
    # A reference KL that is NaN in every row counts as not logged.
    assert plotted([{**on_policy, "kl/mean": float("nan")}] * 5)[KL_PANEL] is None
