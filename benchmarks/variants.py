"""The variant mini-language of ``--models`` and ``--search``, and the search's choice.

A variant is a model with settings in brackets ("T2Diff[lambda_diff=0.1,n_steps=20]"), a named ablation
("T2Diff-noDP", also with brackets: its model's name, a dash, the part it removes) or a preset ("T2Diff-fast": the settings of
properties/presets/T2Diff-fast.yaml, a configuration users run, searched like a model). A variant's name
is its identity: the CSV keys rows by variant and seed, so names must read back to the same settings.
"""

import functools
import itertools
import json
import os
import re

from recbole_t2diff.errors import UsageError
from recbole_t2diff.settings import parse_setting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ABLATIONS = {
    "T2Diff-noDiff": {"use_diffusion": False},
    "T2Diff-copyLast": {"x_hat_source": "copy_last"},
    "T2Diff-positions": {"position_embedding": "learned"},
    "T2Diff-amp": {"enable_amp": True},  # RecBole's mixed precision (bfloat16 on a CPU): the same model, faster steps
    "T2Diff-noDP": {"use_drift": False},
    "T2Diff-noTA": {"use_target_attention": False},
    "T2Diff-linear": {"beta_schedule": "linear"},
    "T2Diff-log": {"beta_schedule": "log"},
    # SparCode's ablations, named as in docs/SPARCODE.md §14; SparCode-dotVQ is its two-tower reduction (§11)
    "SparCode-noVQ": {"quantize": False},
    "SparCode-dot": {"interaction": "dot", "quantize": False, "score_relu": False},
    "SparCode-dotVQ": {"interaction": "dot", "score_relu": False},
    "SparCode-noReLU": {"score_relu": False},
}
OURS = ("T2Diff", "SparCode")  # the package's models; every other model is a RecBole built-in


def split_models(text):
    """The variants of --models: commas inside brackets belong to a variant's settings."""
    return re.findall(r"[^,\[\]]+(?:\[[^\]]*\])?", text)


def against_sasrec(text):
    """The variants of a cost benchmark's --variants, SASRec first: the reference every ratio is taken to."""
    variants = split_models(text)
    if not variants or variants[0] != "SASRec":
        raise UsageError("--variants must start with SASRec, the reference every ratio is taken to")
    return variants


def model_of(name):
    """The model a named ablation or preset is a variant of: "SparCode-dotVQ" -> "SparCode", "T2Diff-fast" -> "T2Diff"."""
    return name.partition("-")[0]


def base_name(variant):
    """The name before any brackets: "T2Diff-noDP[n_steps=20]" -> "T2Diff-noDP"."""
    return variant.partition("[")[0]


def parse_variant(variant):
    """(model name, settings) for "SASRec", "T2Diff-noDP", "T2Diff[lambda_diff=0.1,n_steps=20]" or "T2Diff-noDP[n_steps=20]"."""
    match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", variant)
    if not match or ("-" in match.group(1) and match.group(1) not in ABLATIONS and preset_settings(match.group(1)) is None):
        raise UsageError(
            f"cannot read model '{variant}': write NAME, NAME[key=value,...], one of {', '.join(ABLATIONS)} "
            "or a preset's name (properties/presets/<Model>-<name>.yaml)"
        )
    name, settings = match.group(1), {}
    if name in ABLATIONS:
        name, settings = model_of(name), dict(ABLATIONS[name])
    elif "-" in name:  # a preset: a configuration users run, searched like a model
        name, settings = model_of(name), preset_settings(name)
    for pair in filter(None, (match.group(2) or "").split(",")):
        key, _, value = pair.partition("=")
        settings[key.strip()] = parse_setting(key.strip(), value.strip(), f"in the variant {variant}")
    return name, settings


def preset_file(name):
    """``properties/presets/<name>.yaml`` when ``name`` names a preset (e.g. T2Diff-fast), else None."""
    path = os.path.join(ROOT, "properties", "presets", f"{name}.yaml")
    return path if os.path.isfile(path) else None


def preset_settings(name):
    """The settings of the preset ``name`` (:func:`preset_file`), or None when there is no such preset."""
    path = preset_file(name)
    return None if path is None else dict(read_yaml(path))


@functools.lru_cache(maxsize=None)
def read_yaml(file):
    """A preset's settings, read once per process: a summary parses every variant more than once."""
    import yaml

    with open(file, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def with_settings(variant, point):
    """The variant with the grid point's settings added to its brackets: SASRec -> SASRec[learning_rate=0.001]."""
    name = base_name(variant)
    pairs = [p for p in variant[len(name) :].strip("[]").split(",") if p] + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()]
    return f"{name}[{','.join(pairs)}]" if pairs else name


def parse_grid(text):
    """The points of --search="learning_rate=0.001,0.002;train_batch_size=512,2048", as dicts, in order."""
    axes = []
    for axis in filter(None, (a.strip() for a in text.split(";"))):
        key, sep, values = axis.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise UsageError(f"cannot read --search axis '{axis}': write key=value1,value2 and separate keys with ';'")
        axes.append((key.strip(), [parse_setting(key.strip(), v.strip(), "in --search") for v in values.split(",")]))
    return [dict(zip([k for k, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]


def search_trials(variants, grid):
    """{variant: its variant at every grid point} for the variants a search trains (not the ablations)."""
    searched = [v for v in variants if base_name(v) not in ABLATIONS]
    for model in dict.fromkeys(model_of(base_name(v)) for v in variants if v not in searched):
        if model not in searched:
            raise UsageError(f"with --search the ablations take {model}'s chosen settings: add {model} to --models")
    return {v: [with_settings(v, point) for point in grid] for v in searched}


def pick(variants, grid, seed, rows, trials):
    """{variant: chosen variant}: the trial with the best validation NDCG@10; an ablation takes its model's point.

    ``rows`` are the CSV's rows; a trial without a row failed. Raises SystemExit when every trial of a variant failed.
    """
    chosen, points = {}, {}
    for v, mine in trials.items():
        scores = [(float(row["valid_ndcg@10"]), i) for i, t in enumerate(mine) if (row := find_row(rows, t, seed))]
        if not scores:
            raise SystemExit(f"error: every search run of {v} failed; see the messages above")
        best = max(scores, key=lambda score: score[0])[1]  # a tie goes to the earlier point
        chosen[v], points[v] = mine[best], grid[best]
    for v in variants:
        if v not in chosen:  # an ablation (search_trials makes sure its model was searched)
            chosen[v] = with_settings(v, points[model_of(base_name(v))])
    return chosen


def find_row(rows, variant, seed):
    """The CSV row of (variant, seed), or None: rows are keyed by the two."""
    return next((r for r in rows if r["variant"] == variant and int(r["seed"]) == seed), None)
