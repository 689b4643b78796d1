#!/usr/bin/env bash
# Mutation testing (issue 16): mutmut changes T2Diff's model code and the selection / reload /
# export code one small edit at a time, runs the tests that cover each changed function, and lists
# the mutants no test notices. Not part of CI: the full scope takes hours on 2 CPU cores.
#
#   scripts/mutation.sh                                        # the whole scope below
#   scripts/mutation.sh 'recbole_t2diff.model.attention*'      # only mutants whose names match (fnmatch)
#   TESTS=$'tests/test_model.py\n-k\nnot every_variant' scripts/mutation.sh  # pytest arguments, one a line
#   JOBS=1 OUT=/tmp/mutation scripts/mutation.sh               # workers; where the report goes
#   MINUTES=30 scripts/mutation.sh                             # stop then and report what was tried
#   WORK=/tmp/mutation-work MINUTES=60 scripts/mutation.sh     # keep the scratch copy as well
#
# It runs in a scratch copy of the files git does not ignore (mutmut writes mutants/ and its
# state where it runs, and a concurrent edit of the sources must not reach the mutants) and writes to $OUT
# (default results/mutation/): summary.md (counts and kill score per module), survivors.txt (every
# unexplained survivor with its diff), explained.txt (survivors explained by scripts/mutation_explained.txt
# or recognised as device/encoding-only) and state.json.gz (the verdicts: the next run resumes from them, from a
# fresh clone too, and re-tries the survivors first). Needs mutmut 3.8 (pip install mutmut==3.8.1).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/results/mutation}
# Every in-process test of the mutated code; tests marked `spawns` run a script in a child process,
# which imports the unmutated package from disk, so they are deselected.
tests=${TESTS:-$'tests/test_forward_logic.py\ntests/test_selection.py\ntests/test_model.py\ntests/test_diffusion.py
tests/test_unet.py\ntests/test_export.py\ntests/test_sparcode.py\ntests/test_diffusion_signal.py\ntests/test_hyper.py
tests/test_config.py\ntests/test_time.py\ntests/test_trust.py\ntests/test_knob_bounds.py\n-m\nnot spawns'}
python -c "import mutmut" 2>/dev/null || { echo "error: mutmut is not installed: pip install mutmut==3.8.1" >&2; exit 1; }

# WORK=<dir> keeps the scratch copy, and with it mutmut's results: the same command run again resumes
# (mutants already tried keep their verdict; new tests are picked up; named mutants are re-tried).
if [ -n "${WORK:-}" ]; then
  work=$WORK; mkdir -p "$work"
else
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
fi
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf -) | tar -xf - -C "$work"
{
  echo
  echo "[mutmut]"
  echo "source_paths = recbole_t2diff/"
  echo "only_mutate ="
  for path in "recbole_t2diff/model/*.py" recbole_t2diff/quick_start.py recbole_t2diff/hyper.py recbole_t2diff/export.py; do
    echo "    $path"
  done
  echo "also_copy ="
  for path in properties/ benchmarks/ results/ README.md run_recbole.py run_hyper.py; do echo "    $path"; done
  echo "pytest_add_cli_args_test_selection ="
  while IFS= read -r argument; do echo "    $argument"; done <<< "$tests"
  # Messages (raised directly or through _fail) and log lines are not behaviour the tests pin word for word: an error's tests match
  # its key phrase, so a mutated wording would only add survivors that say nothing about accuracy.
  echo "do_not_mutate_patterns ="
  echo '    UsageError\(|SystemExit\(|\.info\(|\bprint\(|\b_fail\('
  echo '    ^\s*f?"[^"]*"\)?,?$'
  echo "process_isolation = forkserver"  # torch is not fork-safe once it has run
} >> "$work/setup.cfg"

cd "$work"
started=$(date -u +%FT%TZ)
mkdir -p "$out"
# $out/state.json.gz keeps mutmut's verdicts (per module, keyed by each function's hash) so a run
# from a fresh clone resumes where the last one stopped: unchanged functions keep their verdicts, a
# changed function's mutants are tried again. Survivors of earlier runs are re-tried first, against
# the current tests.
if [ ! -d mutants ] && [ -f "$out/state.json.gz" ]; then
  python - "$out/state.json.gz" <<'PY'
import gzip, json, os, sys
for path, meta in json.load(gzip.open(sys.argv[1], "rt")).items():  # mutmut's .meta files, timings left out
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump({**meta, "type_check_error_by_key": {}, "durations_by_key": {}, "estimated_durations_by_key": {}}, open(path, "w"))
PY
fi
retry=$(python - "$repo/scripts/mutation_explained.txt" <<'PY'
import fnmatch, glob, json, sys
patterns = [p for line in open(sys.argv[1], encoding="utf-8") if line.strip() and not line.startswith("#")
            for p in line.split(": ", 1)[0].split()]
names = []
for path in glob.glob("mutants/**/*.meta", recursive=True):
    names += [key for key, code in json.load(open(path))["exit_code_by_key"].items()
              if code in (0, 33, 255) and not any(fnmatch.fnmatchcase(key.split(".", 1)[1], p) for p in patterns)]
print(" ".join(sorted(names)))
PY
)
deadline=$(( $(date +%s) + ${MINUTES:-100000} * 60 ))
mutate() {  # mutmut run [names], stopped with SIGINT at the deadline: it then keeps every verdict it has
  local left=$(( deadline - $(date +%s) )) status=0
  [ "$left" -gt 60 ] || return 0
  OMP_NUM_THREADS=1 nice -n 10 timeout --signal=INT "$left" mutmut run --max-children "${JOBS:-2}" "$@" >> "$out/mutmut.log" 2>&1 || status=$?
  if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then
    tail -n 30 "$out/mutmut.log" >&2
    echo "error: mutmut failed (log: $out/mutmut.log)" >&2
    exit 1
  fi
}
: > "$out/mutmut.log"
if [ -n "$retry" ] && [ $# -eq 0 ]; then
  rm -f mutants/mutmut-stats.json  # which tests cover which function, collected afresh: edited tests count too
  # shellcheck disable=SC2086  # the names hold no spaces
  mutate $retry
fi
mutate "$@"
python - "$out/state.json.gz" <<'PY'
import glob, gzip, json, sys
state = {path: {key: json.load(open(path))[key] for key in ("exit_code_by_key", "hash_by_function_name")}
         for path in sorted(glob.glob("mutants/**/*.meta", recursive=True))}
with gzip.open(sys.argv[1], "wt") as f:
    json.dump(state, f, sort_keys=True)
PY
python - "$out" "$started" "$*" "$tests" "$repo/scripts/mutation_explained.txt" <<'PY'
import ast, collections, difflib, fnmatch, functools, glob, json, os, re, sys

out, started, selection, tests, explained_file = sys.argv[1:]
# Verdicts from mutmut's exit codes. 255 is not a verdict: the test harness raised (mutmut would call
# it a timeout), e.g. when a test id it recorded no longer matches; such mutants are re-tried next run.
OUTCOME = {0: "survived", 1: "killed", 3: "killed", 5: "no tests", 33: "no tests", 36: "timeout", 24: "timeout",
           -24: "timeout", 152: "timeout", -9: "segfault", -11: "segfault", 255: "harness error"}
status = {}
for path in glob.glob("mutants/**/*.meta", recursive=True):
    for name, code in json.load(open(path))["exit_code_by_key"].items():
        status[name] = "not checked" if code is None else OUTCOME.get(code, "suspicious")
tried = {name: s for name, s in status.items() if s not in ("not checked", "harness error")}
KILLED = ("killed", "timeout", "segfault")
survivors = sorted(name for name, s in tried.items() if s not in KILLED)

# scripts/mutation_explained.txt: "<name pattern> [<name pattern> ...]: why it survives" per line, the
# patterns (fnmatch, without the leading "recbole_t2diff.") naming equivalent mutants and out-of-scope code.
reasons = []
for line in open(explained_file, encoding="utf-8"):
    if line.strip() and not line.startswith("#"):
        patterns, why = line.split(": ", 1)
        reasons += [(pattern, why.strip()) for pattern in patterns.split()]


# Two kinds are recognised from the diff alone: a changed or dropped ``device=`` (the tests run on a
# CPU, where every tensor is on the one device; on a GPU the mismatch raises, it is not silent) and a
# changed or dropped ``encoding=`` (None and "UTF-8" are utf-8 in the UTF-8 locale the tests run in).
AUTOMATIC = {"device": "device placement only: one device on the CPU the tests run on; a GPU mismatch raises",
             "encoding": "file encoding only: None and 'UTF-8' are utf-8 in a UTF-8 locale"}


def only_changes(name, keyword):
    lines = diff(name).splitlines()
    removed = [line[1:] for line in lines if line.startswith("-")]
    added = [line[1:] for line in lines if line.startswith("+")]
    strip = lambda line: re.sub(rf",?\s*{keyword}=[^,)]*", "", line).replace(", )", ")").replace("(, ", "(").replace(" ", "")
    return len(removed) == len(added) == 1 and keyword in removed[0] and strip(removed[0]) == strip(added[0])


def explanation(name):
    short = name.split(".", 1)[1]
    listed = next((why for pattern, why in reasons if fnmatch.fnmatchcase(short, pattern)), None)
    return listed or next((why for keyword, why in AUTOMATIC.items() if only_changes(name, keyword)), None)


@functools.lru_cache(maxsize=None)
def functions(module):
    """Source of every function mutmut wrote into mutants/<module>.py (``mutmut show`` per mutant is slow)."""
    source = open(os.path.join("mutants", *module.split(".")) + ".py").read()
    lines, tree = source.splitlines(), ast.parse(source)
    nodes = list(tree.body) + [node for c in tree.body if isinstance(c, ast.ClassDef) for node in c.body]
    return {n.name: lines[n.lineno - 1:n.end_lineno] for n in nodes if isinstance(n, ast.FunctionDef)}


def diff(name):
    module, function = name.rsplit(".", 1)
    original = function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    found = functions(module)
    return "\n".join(line for line in difflib.unified_diff(
        [line.replace(original, "f") for line in found[original]], [line.replace(function, "f") for line in found[function]],
        lineterm="", n=0) if line[:1] in "+-" and not line.startswith(("+++", "---")))


explained = {name: explanation(name) for name in survivors}
unexplained = [name for name in survivors if explained[name] is None]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "survivors.txt"), "w") as f:
    for name in unexplained:
        f.write(f"## {name}: {tried[name]}\n{diff(name)}\n\n")
with open(os.path.join(out, "explained.txt"), "w") as f:
    for name in survivors:
        if explained[name]:
            f.write(f"## {name}: {tried[name]}: {explained[name]}\n{diff(name)}\n\n")

rows = collections.defaultdict(collections.Counter)
for name, s in status.items():
    module = name.split(".x", 1)[0].split(".", 1)[1]
    row = rows[module]
    row["generated"] += 1
    if s not in ("not checked", "harness error"):  # harness errors are counted in the outcomes line
        row["tried"] += 1
        row["killed"] += s in KILLED
        row["explained"] += s not in KILLED and explained.get(name) is not None
        row["unexplained"] += s not in KILLED and explained.get(name) is None
total = sum(rows.values(), collections.Counter())


def score(row):
    counted = row["tried"] - row["explained"]
    return f"{row['killed'] / counted:.1%}" if counted else "-"


with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(f"# Mutation run of {started}\n\n")
    f.write(f"Command: `scripts/mutation.sh {selection}`; tests: {' '.join(tests.splitlines())}\n\n")
    f.write("Explained: equivalent mutants and code out of the scope's tests, one line each in scripts/mutation_explained.txt "
            "(listed with their diffs in explained.txt). Score: killed / (tried - explained). Unexplained survivors: survivors.txt.\n\n")
    f.write("| module | generated | tried | killed | explained | unexplained | score |\n|---|---|---|---|---|---|---|\n")
    for module, row in sorted(rows.items()) + [("**all**", total)]:
        f.write(f"| {module} | {row['generated']} | {row['tried']} | {row['killed']} | {row['explained']} | {row['unexplained']} | {score(row)} |\n")
    f.write("\nOutcomes: " + ", ".join(f"{n} {s}" for s, n in collections.Counter(status.values()).most_common()) + "\n")
print(open(os.path.join(out, "summary.md")).read())
PY
