"""RunLogger: JSON lines, progress line, samples table, plot."""

import io
import json
import os

from rlx.train.logger import RunLogger


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
    text = out.getvalue()
    assert "[....................] -3/4" in text and "[####################] 4/4" in text
    assert "| 1.00 | 1+1= | 2 |" in open(tmp_path / "samples.md").read()
    assert path and os.path.getsize(path) > 1000
    assert os.path.isdir(tmp_path / "tensorboard")
