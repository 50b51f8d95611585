"""``python -m riverscape``: the command line, without the working directory on ``sys.path``.

``python -m`` puts the working directory first on ``sys.path``; a file there named like an
optional dependency (``pandas.py``) would then run whenever a library tries that import.
It is removed before anything else is imported, and the signal handlers are installed
before the command line itself is imported.
"""
import os
import sys

if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from riverscape._signals import run_console  # noqa: E402  (after the sys.path fix on purpose)

run_console()
