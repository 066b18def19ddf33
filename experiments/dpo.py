"""Runs experiments/configs/dpo.gin (same as: rlx dpo --gin_file=experiments/configs/dpo.gin).

Extra gin bindings may follow on the command line, e.g.
  python experiments/dpo.py 'rlx.train.RLConfig.steps = 10'
"""

import os
import sys

from rlx.rlhf_cli import preference_main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    preference_main("dpo", [os.path.join(here, "configs", "dpo.gin")], sys.argv[1:])
