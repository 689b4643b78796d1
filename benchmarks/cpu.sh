#!/usr/bin/env bash
# (Re)start the converged table's CPU batch in the background and return at once.
#
#   bash benchmarks/cpu.sh [PLAN ...]   # default benchmarks/plans/cpu.plan; RUNS=/work/runs/NAME JOBS=1 for other plans beside it
#                                       # GROUP_NICE=5 gives this batch a larger share than another at the default 15
#                                       # (several PLANs run one after another in one pool, as benchmarks.batch reads them)
#   tail -f "$RUNS/batch.log"           # one line per validation and per finished run, with an estimate of the time left
#
# Two runs at a time (JOBS), one torch thread each, at nice 15, so that tests and other work keep the CPU they need.
# Finished rows (in the plan's CSVs) are skipped; an unfinished run goes on from its last validated epoch, whose
# state lives under $RUNS (default /work/runs/converged, outside the work tree, so a fresh checkout keeps it).
# Started while the batch is running, it says so and starts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
plans=("${@:-benchmarks/plans/cpu.plan}")
runs=${RUNS:-/work/runs/converged}
mkdir -p "$runs"
if [ -f "$runs/batch.pid" ] && kill -0 "$(cat "$runs/batch.pid")" 2>/dev/null; then
  echo "the batch is already running (pid $(cat "$runs/batch.pid")): tail -f $runs/batch.log"
  exit 0
fi
python -m benchmarks.batch "${plans[@]}" --check  # a misspelt setting fails here, in one line
echo "[cpu.sh] $(date -u '+%F %T') UTC: ${plans[*]} started in $PWD (${JOBS:-2} at a time, scheduler-group nice ${GROUP_NICE:-15})" >> "$runs/batch.log"
PYTHONUNBUFFERED=1 nohup setsid nice -n 15 python -m benchmarks.batch "${plans[@]}" --jobs="${JOBS:-2}" --threads=1 --resume_root="$runs/resume" \
  >> "$runs/batch.log" 2>&1 < /dev/null &
# setsid gives the batch its own scheduler autogroup, inside which nice alone has no effect against other sessions:
# the group's own nice value is what makes it yield to tests and foreground work (and, between two batches, how they
# share: nice 5 against 15 gives about 9 parts in 10).
# Wait for setsid to have made the new session (and its group): writing earlier would lower this shell's group instead.
pid=$!
echo "$pid" > "$runs/batch.pid"
for _ in $(seq 50); do [ "$(ps -o sid= -p "$pid" | tr -d ' ')" = "$pid" ] && break; sleep 0.1; done
if [ "$(ps -o sid= -p "$pid" | tr -d ' ')" = "$pid" ] && echo "${GROUP_NICE:-15}" > "/proc/$pid/autogroup" 2>/dev/null; then :; else
  echo "note: the batch's scheduler group could not be lowered (/proc/$pid/autogroup): it competes with foreground work"
fi
echo "started (pid $pid): tail -f $runs/batch.log"
