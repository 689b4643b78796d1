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


def check_settings_arguments(arguments):
    """Refuse what argparse left over and RecBole's Config would not read (it only logs a warning):
    RecBole reads ``--key=value`` with exactly one ``=``, so ``--epochs 1`` trained 100 epochs."""
    for index, argument in enumerate(arguments):
        if argument.startswith("--") and argument.count("=") == 1:
            continue
        following = arguments[index + 1] if index + 1 < len(arguments) else None
        if argument.startswith("--") and "=" not in argument:
            value = following if following is not None and not following.startswith("--") else "VALUE"
            raise UsageError(f"'{argument}' has no value: settings are written with '=', not a space; use {argument}={value}")
        if argument.startswith("--"):
            raise UsageError(
                f"'{argument}' has more than one '=': RecBole reads --key=value with one '='; put this setting in a yaml file "
                "given with --config_files"
            )
        raise UsageError(f"unexpected argument '{argument}': settings are written --key=value (e.g. --epochs=1)")
