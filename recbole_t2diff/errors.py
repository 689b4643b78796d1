"""The one exception type the entry points turn into a one-line message and exit code 1."""


class UsageError(Exception):
    """Bad input from the user: an unknown model, a missing dataset, an invalid knob.

    The message says what is wrong and how to fix it, in one line.
    """
