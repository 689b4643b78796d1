"""The models' knob vocabulary: one reader per kind of setting (integer, number, fraction, boolean, one of a list,
layer widths), each of which checks a knob once and returns it in its working type.

A model's ``check_config`` reads its knobs through a :class:`KnobReader` and returns ``reader.settings()``, the
parsed values its constructor builds from; a bad value raises a one-line UsageError that names the model, the
setting and its value, and says what to give instead: ``invalid T2Diff setting n_steps=0: it must be an integer >= 1``.
"""

import math
import numbers
from types import MappingProxyType

from recbole_t2diff.errors import UsageError


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _interval(minimum, maximum, below):
    if below is not None:
        return f"[{minimum}, {below})"
    return f"[{minimum}, {maximum}]"


class KnobReader:
    """Reads the knobs of ``model`` (its name, for the messages) from a resolved ``config``, where a missing key
    reads as None as in RecBole's Config. Every value read is recorded in :meth:`settings`."""

    def __init__(self, config, model):
        self.config, self.model, self._values = config, model, {}

    def refuse(self, key, value, why):
        raise UsageError(f"invalid {self.model} setting {key}={value}: {why}")

    def keep(self, key, value):
        """Records ``value`` as the parsed setting ``key`` (a derived value, or a knob checked elsewhere) and returns it."""
        self._values[key] = value
        return value

    def raw(self, key):
        """The knob as given, recorded unchecked: names and lists that RecBole or a dataset check, seeds."""
        return self.keep(key, self.config[key])

    def integer(self, key, minimum=1, optional=False):
        """An integer >= ``minimum``; a float without a fraction counts (hyperopt's quniform gives floats).
        ``optional``: None is allowed and kept."""
        value = self.config[key]
        if value is None and optional:
            return self.keep(key, None)
        if not _is_number(value) or not math.isfinite(value) or value != int(value) or int(value) < minimum:
            self.refuse(key, value, f"it must be an integer >= {minimum}")
        return self.keep(key, int(value))

    def number(self, key, minimum=None, maximum=None, below=None, optional=False, example=None):
        """A float, at least ``minimum`` and at most ``maximum`` or below ``below`` where given (NaN is refused).
        ``optional``: None is allowed and kept. ``example`` is named when an unbounded number is refused."""
        value = self.config[key]
        if value is None and optional:
            return self.keep(key, None)
        if not _is_number(value):
            if minimum is None:
                self.refuse(key, value, f"it must be a number, e.g. {example}" if example else "it must be a number")
            bound = f">= {minimum}" if maximum is None and below is None else f"in {_interval(minimum, maximum, below)}"
            self.refuse(key, value, f"it must be a number {bound}")
        if minimum is not None and not value >= minimum:  # "not >=" also refuses NaN
            bounded = maximum is not None or below is not None
            self.refuse(key, value, f"it must lie in {_interval(minimum, maximum, below)}" if bounded else f"it must be >= {minimum}")
        if (maximum is not None and not value <= maximum) or (below is not None and not value < below):
            self.refuse(key, value, f"it must lie in {_interval(minimum, maximum, below)}")
        return self.keep(key, float(value))

    def fraction(self, key):
        """A share in [0, 1): dropout probabilities, decays, leaks."""
        return self.number(key, minimum=0, below=1)

    def boolean(self, key):
        value = self.config[key]
        if not isinstance(value, bool):
            self.refuse(key, value, "use true or false")
        return self.keep(key, value)

    def one_of(self, key, choices):
        value = self.config[key]
        if value not in choices:
            self.refuse(key, value, f"use one of {', '.join(choices)}")
        return self.keep(key, value)

    def widths(self, key, allow_empty=False):
        """Layer widths: a list of positive integers. ``allow_empty``: no layer at all, [] or None, is allowed."""
        widths = self.config[key]
        if allow_empty and widths is None:
            widths = []
        valid = isinstance(widths, (list, tuple)) and (allow_empty or widths)
        if not valid or any(not _is_number(w) or w != int(w) or w < 1 for w in widths):
            self.refuse(
                key,
                widths,
                "give a list of positive integers, e.g. [64]" if allow_empty else "give a non-empty list of positive integers, e.g. [256, 256, 256]",
            )
        return self.keep(key, [int(w) for w in widths])

    def settings(self):
        """The parsed settings read so far, read-only."""
        return MappingProxyType(dict(self._values))
