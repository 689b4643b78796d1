"""Shared behaviour of the command-line scripts."""
import contextlib
import sys

from recbole_t2diff.errors import UsageError

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a run stopped by Ctrl-C


@contextlib.contextmanager
def exit_on_usage_error():
    """Turn a :class:`UsageError` into one line on stderr and exit code 1, and Ctrl-C into one line
    saying what was kept (``quick_start.TrainingInterrupted`` carries it) and exit code 130, without
    a traceback."""
    try:
        yield
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        print(f"interrupted: {err or 'stopped by Ctrl-C'}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)

