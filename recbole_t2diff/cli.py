"""Shared behaviour of the command-line scripts."""

import contextlib
import sys

from recbole_t2diff.errors import UsageError
from recbole_t2diff.settings import command_line_settings

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


def parse_script_arguments(parser, argv):
    """(the script's options, the ``--key=value`` settings left over) of ``argv``, the script's arguments (a list).

    argparse keeps the last of an option given twice without a word (``--model=SASRec ... --model=T2Diff``
    trained T2Diff): that is refused in one line, like a setting given twice; the settings are checked
    (``settings.command_line_settings``) before anything starts.
    """
    args, settings = parser.parse_known_args(argv)
    seen = {}
    for argument in argv:
        name = argument.split("=", 1)[0]
        action = parser._option_string_actions.get(name)
        if action is None:
            continue
        if action.dest in seen:
            raise UsageError(f"{name} is given twice (as {seen[action.dest]} and {argument}): give it once")
        seen[action.dest] = argument
    command_line_settings(settings)
    return args, settings
