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
    from ._signals import EXIT_INTERRUPTED, EXIT_TERMINATED, exit_code_of, handlers_installed

    with handlers_installed():
        try:
            from .cli import main

            code = main()
        except KeyboardInterrupt as exc:  # main() handles its own; this covers the instants around it
            code = exit_code_of(exc)
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        # An interrupt can cut short one of the imports torch, plotly or scipy make lazily while the
        # analysis runs (torch._dynamo, sympy, ...); finalising the interpreter with such a
        # half-initialised module can end the process by SIGINT or SIGABRT instead of the exit code.
        # The outputs were cleaned up while the interrupt unwound, so leave without finalising.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    run_console()
