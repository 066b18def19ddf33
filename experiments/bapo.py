"""Runs experiments/configs/bapo.gin (same as: rlx train --gin_file=experiments/configs/bapo.gin).

Extra gin bindings may follow on the command line, e.g.
  python experiments/bapo.py 'rlx.train.RLConfig.steps = 10'
"""

import os
import sys

from rlx.train.cli import train_main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    train_main([os.path.join(here, "configs", "bapo.gin")], sys.argv[1:])
