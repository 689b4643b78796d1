"""Shared behaviour of the command-line scripts."""
import contextlib
import sys

from recbole_t2diff.errors import UsageError


@contextlib.contextmanager
def exit_on_usage_error():
    """Turn a :class:`UsageError` into one line on stderr and exit code 1, without a traceback."""
    try:
        yield
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
