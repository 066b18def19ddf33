"""Runs experiments/configs/qwen2.5.gin (same as: rlx train --gin_file=experiments/configs/qwen2.5.gin).

Extra gin bindings may follow on the command line, e.g.
  python experiments/qwen2_5.py 'rlx.train.RLConfig.steps = 10'
"""

import os
import sys

from rlx.train.cli import train_main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    train_main([os.path.join(here, "configs", "qwen2.5.gin")], sys.argv[1:])
