"""Entry point of reward worker processes: ``python -m rlx.rewards._worker_main FD FD``.

Kept apart from ``_pool_worker`` (which the package imports) so that ``runpy`` does not
execute an already-imported module as ``__main__``.
"""

import sys

from rlx.rewards._pool_worker import main

if __name__ == "__main__":
    main(sys.argv)
