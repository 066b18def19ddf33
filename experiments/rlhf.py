"""Runs experiments/configs/rlhf.gin (same as: rlx rlhf --gin_file=experiments/configs/rlhf.gin).

Extra gin bindings may follow on the command line, e.g.
  python experiments/rlhf.py 'rlx.train.RLConfig.steps = 10'
"""

import os
import sys

from rlx.rlhf_cli import preference_main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    preference_main("rlhf", [os.path.join(here, "configs", "rlhf.gin")], sys.argv[1:])
