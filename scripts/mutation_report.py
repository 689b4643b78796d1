"""The bookkeeping of scripts/mutation.sh, run in its scratch copy (where mutmut wrote ``mutants/``).

    mutation_report.py restore STATE           # verdicts of an earlier run back into mutants/*.meta
    mutation_report.py retry EXPLAINED         # the names to try again: survivors not explained, harness errors
    mutation_report.py save STATE              # the verdicts into STATE (json.gz), for the next run
    mutation_report.py report OUT STARTED SELECTION TESTS EXPLAINED   # summary.md, survivors.txt, explained.txt

STATE keeps mutmut's verdicts per module, keyed by each function's hash, so a run from a fresh clone
resumes where the last one stopped: unchanged functions keep their verdicts, a changed function's
mutants are tried again. EXPLAINED is scripts/mutation_explained.txt: "<name pattern> [<name pattern>
...]: why it survives" per line, the patterns (fnmatch, without the leading "recbole_t2diff.") naming
equivalent mutants and out-of-scope code.
"""

import ast
import collections
import difflib
import fnmatch
import functools
import glob
import gzip
import json
import os
import re
import sys

# Verdicts from mutmut's exit codes. 255 is not a verdict: the test harness raised (mutmut would call
# it a timeout), e.g. when a test id it recorded no longer matches; such mutants are re-tried next run.
OUTCOME = {
    0: "survived",
    1: "killed",
    3: "killed",
    5: "no tests",
    33: "no tests",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    -9: "segfault",
    -11: "segfault",
    255: "harness error",
}
KILLED = ("killed", "timeout", "segfault")
RETRIED = (0, 33, 255)  # survived, no tests, harness error

# Two kinds are recognised from the diff alone: a changed or dropped ``device=`` (the tests run on a
# CPU, where every tensor is on the one device; on a GPU the mismatch raises, it is not silent) and a
# changed or dropped ``encoding=`` (None and "UTF-8" are utf-8 in the UTF-8 locale the tests run in).
AUTOMATIC = {
    "device": "device placement only: one device on the CPU the tests run on; a GPU mismatch raises",
    "encoding": "file encoding only: None and 'UTF-8' are utf-8 in a UTF-8 locale",
}


def meta_files():
    """{path: contents} of every mutants/**/*.meta mutmut wrote."""
    return {path: json.load(open(path)) for path in sorted(glob.glob("mutants/**/*.meta", recursive=True))}


def exit_codes():
    """{mutant name: mutmut's exit code, None when not tried}."""
    return {name: code for meta in meta_files().values() for name, code in meta["exit_code_by_key"].items()}


def read_explanations(path):
    """[(pattern, why)] from the explained file, in its order."""
    reasons = []
    for line in open(path, encoding="utf-8"):
        if line.strip() and not line.startswith("#"):
            patterns, why = line.split(": ", 1)
            reasons += [(pattern, why.strip()) for pattern in patterns.split()]
    return reasons


def listed_reason(name, reasons):
    short = name.split(".", 1)[1]
    return next((why for pattern, why in reasons if fnmatch.fnmatchcase(short, pattern)), None)


def restore(state_path):
    for path, meta in json.load(gzip.open(state_path, "rt")).items():  # mutmut's .meta files, timings left out
        os.makedirs(os.path.dirname(path), exist_ok=True)
        json.dump({**meta, "type_check_error_by_key": {}, "durations_by_key": {}, "estimated_durations_by_key": {}}, open(path, "w"))


def retry(explained_path):
    reasons = read_explanations(explained_path)
    print(" ".join(sorted(name for name, code in exit_codes().items() if code in RETRIED and listed_reason(name, reasons) is None)))


def save(state_path):
    state = {path: {key: meta[key] for key in ("exit_code_by_key", "hash_by_function_name")} for path, meta in meta_files().items()}
    with gzip.open(state_path, "wt") as f:
        json.dump(state, f, sort_keys=True)


@functools.lru_cache(maxsize=None)
def functions(module):
    """Source of every function mutmut wrote into mutants/<module>.py (``mutmut show`` per mutant is slow)."""
    source = open(os.path.join("mutants", *module.split(".")) + ".py").read()
    lines, tree = source.splitlines(), ast.parse(source)
    nodes = list(tree.body) + [node for c in tree.body if isinstance(c, ast.ClassDef) for node in c.body]
    return {n.name: lines[n.lineno - 1 : n.end_lineno] for n in nodes if isinstance(n, ast.FunctionDef)}


def diff(name):
    module, function = name.rsplit(".", 1)
    original = function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    found = functions(module)
    return "\n".join(
        line
        for line in difflib.unified_diff(
            [line.replace(original, "f") for line in found[original]], [line.replace(function, "f") for line in found[function]], lineterm="", n=0
        )
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    )


def only_changes(change, keyword):
    """Whether the diff ``change`` only changes or drops ``keyword=`` on one line."""
    lines = change.splitlines()
    removed = [line[1:] for line in lines if line.startswith("-")]
    added = [line[1:] for line in lines if line.startswith("+")]
    strip = lambda line: re.sub(rf",?\s*{keyword}=[^,)]*", "", line).replace(", )", ")").replace("(, ", "(").replace(" ", "")
    return len(removed) == len(added) == 1 and keyword in removed[0] and strip(removed[0]) == strip(added[0])


def score(row):
    counted = row["tried"] - row["explained"]
    return f"{row['killed'] / counted:.1%}" if counted else "-"


def report(out, started, selection, tests, explained_path):
    status = {name: "not checked" if code is None else OUTCOME.get(code, "suspicious") for name, code in exit_codes().items()}
    tried = {name: s for name, s in status.items() if s not in ("not checked", "harness error")}
    survivors = sorted(name for name, s in tried.items() if s not in KILLED)
    reasons = read_explanations(explained_path)
    diffs = {name: diff(name) for name in survivors}
    explained = {
        name: listed_reason(name, reasons) or next((why for keyword, why in AUTOMATIC.items() if only_changes(diffs[name], keyword)), None)
        for name in survivors
    }

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "survivors.txt"), "w") as f:
        for name in survivors:
            if explained[name] is None:
                f.write(f"## {name}: {tried[name]}\n{diffs[name]}\n\n")
    with open(os.path.join(out, "explained.txt"), "w") as f:
        for name in survivors:
            if explained[name]:
                f.write(f"## {name}: {tried[name]}: {explained[name]}\n{diffs[name]}\n\n")

    rows = collections.defaultdict(collections.Counter)
    for name, s in status.items():
        row = rows[name.split(".x", 1)[0].split(".", 1)[1]]
        row["generated"] += 1
        if s not in ("not checked", "harness error"):  # harness errors are counted in the outcomes line
            row["tried"] += 1
            row["killed"] += s in KILLED
            row["explained"] += s not in KILLED and explained.get(name) is not None
            row["unexplained"] += s not in KILLED and explained.get(name) is None
    total = sum(rows.values(), collections.Counter())

    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Mutation run of {started}\n\n")
        f.write(f"Command: `scripts/mutation.sh {selection}`; tests: {' '.join(tests.splitlines())}\n\n")
        f.write(
            "Explained: equivalent mutants and code out of the scope's tests, one line each in scripts/mutation_explained.txt "
            "(listed with their diffs in explained.txt). Score: killed / (tried - explained). Unexplained survivors: survivors.txt.\n\n"
        )
        f.write("| module | generated | tried | killed | explained | unexplained | score |\n|---|---|---|---|---|---|---|\n")
        for module, row in sorted(rows.items()) + [("**all**", total)]:
            f.write(f"| {module} | {row['generated']} | {row['tried']} | {row['killed']} | {row['explained']} | {row['unexplained']} | {score(row)} |\n")
        f.write("\nOutcomes: " + ", ".join(f"{n} {s}" for s, n in collections.Counter(status.values()).most_common()) + "\n")
    print(open(os.path.join(out, "summary.md")).read())


if __name__ == "__main__":
    step, *arguments = sys.argv[1:]
    {"restore": restore, "retry": retry, "save": save, "report": report}[step](*arguments)
