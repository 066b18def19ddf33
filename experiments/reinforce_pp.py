"""Runs experiments/configs/reinforce_pp.gin (same as: rlx train --gin_file=experiments/configs/reinforce_pp.gin).

Extra gin bindings may follow on the command line, e.g.
  python experiments/reinforce_pp.py 'rlx.train.RLConfig.steps = 10'
"""

import os
import sys

from rlx.train.cli import train_main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    train_main([os.path.join(here, "configs", "reinforce_pp.gin")], sys.argv[1:])
