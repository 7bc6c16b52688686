"""``python -m benchmarks``: see :mod:`benchmarks.cli`.

Spawned processes (the process pool's and the pipe floor's) import this module
as ``__mp_main__``; the guard keeps them from running the suite.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from .cli import main

    sys.exit(main())
