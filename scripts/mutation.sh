#!/usr/bin/env bash
# Mutation testing (issue 16): mutmut changes the model code (T2Diff, SparCode and its index) and the
# selection / reload / export code one small edit at a time, runs the tests that cover each changed function, and lists
# the mutants no test notices. Not part of CI: the full scope takes hours on 2 CPU cores.
#
#   scripts/mutation.sh                                        # the whole scope below
#   scripts/mutation.sh 'recbole_t2diff.model.attention*'      # only mutants whose names match (fnmatch)
#   TESTS=$'tests/test_t2diff.py\n-k\nnot every_variant' scripts/mutation.sh  # pytest arguments, one a line
#   JOBS=1 OUT=/tmp/mutation scripts/mutation.sh               # workers; where the report goes
#   MINUTES=30 scripts/mutation.sh                             # stop then and report what was tried
#   WORK=/tmp/mutation-work MINUTES=60 scripts/mutation.sh     # keep the scratch copy as well
#
# It runs in a scratch copy of the files git does not ignore (mutmut writes mutants/ and its
# state where it runs, and a concurrent edit of the sources must not reach the mutants) and writes to $OUT
# (default results/mutation/): summary.md (counts and kill score per module), survivors.txt (every
# unexplained survivor with its diff), explained.txt (survivors explained by scripts/mutation_explained.txt
# or recognised as device/encoding-only) and state.json.gz (the verdicts: the next run resumes from them, from a
# fresh clone too, and re-tries the survivors first); scripts/mutation_report.py does that bookkeeping.
# Needs mutmut 3.8 (pip install mutmut==3.8.1).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/results/mutation}
# Every in-process test of the mutated code; tests marked `spawns` run a script in a child process,
# which imports the unmutated package from disk, so they are deselected.
tests=${TESTS:-$'tests/test_t2diff.py\ntests/test_t2diff_order.py\ntests/test_t2diff_time.py\ntests/test_generator.py
tests/test_attention.py\ntests/test_diffusion.py\ntests/test_unet.py\ntests/test_knobs.py
tests/test_sparcode.py\ntests/test_quantizer.py\ntests/test_sparse_index.py\ntests/test_config.py
tests/test_settings.py\ntests/test_compat.py\ntests/test_data.py\ntests/test_checkpoint.py
tests/test_convert.py\ntests/test_quick_start.py\ntests/test_distributed.py\ntests/test_export.py
tests/test_ann.py\ntests/test_hyper.py\ntests/test_cli.py\n-m\nnot spawns'}
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
  for path in "recbole_t2diff/model/*.py" recbole_t2diff/quick_start.py recbole_t2diff/hyper.py recbole_t2diff/export.py \
              recbole_t2diff/checkpoint.py recbole_t2diff/sparse_index.py; do
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
# $out/state.json.gz keeps mutmut's verdicts, so a run from a fresh clone resumes where the last one
# stopped; survivors of earlier runs are re-tried first, against the current tests.
report() { python "$repo/scripts/mutation_report.py" "$@"; }  # restore / retry / save / report: the bookkeeping
if [ ! -d mutants ] && [ -f "$out/state.json.gz" ]; then
  report restore "$out/state.json.gz"
fi
retry=$(report retry "$repo/scripts/mutation_explained.txt")
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
report save "$out/state.json.gz"
report report "$out" "$started" "$*" "$tests" "$repo/scripts/mutation_explained.txt"
