"""What a benchmark row ran with, and whether a finished row still means what its variant's name means now.

Rows are keyed by variant name and seed, and a plan skips the pairs its CSV holds. A name means the property files'
values plus the variant's settings (a preset's too): change a default in ``properties/`` or a preset after a row
landed, and the row would be reused as if it had run under the new meaning. So each row records the values its
run read for every setting this package's property files name (column ``knobs``), and a study refuses to reuse a
row whose recorded values or settings differ from what the name gives now, in one line that says which.
"""

import functools
import json

import yaml

from benchmarks.variants import parse_variant
from recbole_t2diff.checkpoint import UNCHECKED_SETTINGS
from recbole_t2diff.errors import UsageError
from recbole_t2diff.properties import property_files


@functools.lru_cache(maxsize=None)
def named_keys(model, dataset):
    """The settings this package's property files name for ``model`` on ``dataset``, machine and path settings left out
    (they differ between machines and change no result). Read once per process: a plan checks every finished row."""
    keys = set()
    for path in property_files(model, dataset, sequential=True):
        with open(path, encoding="utf-8") as f:
            keys |= set(yaml.safe_load(f) or {})
    return tuple(sorted(keys - UNCHECKED_SETTINGS))


def knob_values(config):
    """{key: value} for every setting of :func:`named_keys` for the config's model and dataset, as the config resolved it."""
    # as JSON reads it back, so that a recorded value and a current one compare alike (anything else as its text)
    return {key: json.loads(json.dumps(config[key], default=str)) for key in named_keys(config["model"], config["dataset"])}


def stale_reason(row, variant, config):
    """Why ``row`` (a CSV row of ``variant``) no longer means what ``variant`` means with ``config`` (its current
    Config), or None when it still does. Rows from before the ``knobs`` column are checked on their settings only;
    a setting the files did not name when the row ran is taken to have kept the old behaviour."""
    now = json.dumps(parse_variant(variant)[1], sort_keys=True)
    if row.get("settings") and row["settings"] != now:
        return f"its settings were {row['settings']}, the name gives {now} now"
    if not row.get("knobs"):
        return None
    recorded, current = json.loads(row["knobs"]), knob_values(config)
    changed = [key for key in sorted(recorded.keys() & current.keys()) if recorded[key] != current[key]]
    if not changed:
        return None
    return (
        "it ran with "
        + ", ".join(f"{key}={json.dumps(recorded[key])}" for key in changed)
        + "; the property files give "
        + (", ".join(f"{key}={json.dumps(current[key])}" for key in changed))
    )


def refuse_stale(csv_path, row, variant, config):
    """A one-line UsageError when the finished ``row`` of ``variant`` is stale (:func:`stale_reason`)."""
    reason = stale_reason(row, variant, config)
    if reason is not None:
        raise UsageError(
            f"{csv_path}: the row of {variant} seed {row['seed']} no longer means what that name means: {reason}; a plan would "
            "reuse it as current: give the row's variant the old values in brackets (python -m benchmarks.rename_rows CSV OLD NEW "
            "with the plan line's --key=value settings), or delete the row to run it again"
        )
