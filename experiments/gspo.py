"""Runs experiments/configs/gspo.gin (same as: rlx train --gin_file=experiments/configs/gspo.gin).

Extra gin bindings may follow on the command line, e.g.
  python experiments/gspo.py 'rlx.train.RLConfig.steps = 10'
"""

import os
import sys

from rlx.train.cli import train_main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    train_main([os.path.join(here, "configs", "gspo.gin")], sys.argv[1:])
