"""``python -m riverscape`` and the ``riverscape`` script: signal handlers first, then the command line.

``python -m`` puts the working directory first on ``sys.path``; a file there named like an
optional dependency (``pandas.py``) would then run whenever a library tries that import.
It is removed before anything else is imported, and the signal handlers are installed
before the command line itself is imported.
"""
import os
import sys


def run_console() -> None:
    """Entry point of the ``riverscape`` script (and of ``python -m riverscape``)."""
    from ._signals import exit_code_of, handlers_installed

    with handlers_installed():
        try:
            from .cli import main

            code = main()
        except KeyboardInterrupt as exc:  # main() handles its own; this covers the instants around it
            code = exit_code_of(exc)
    sys.exit(code)


if __name__ == "__main__":
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    run_console()
