#!/usr/bin/env bash
# The arms of ml-100k.md, one right after the other under the same machine load: the same params
# file, fixed settings and seed, on Ray without and with ASHA. Run from an empty scratch folder:
#   bash /path/to/results/ray/measure.sh > measure.log 2>&1
# ARMS="asha none hyperopt" runs them in that order (hyperopt: the same search on the hyperopt backend).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
for arm in ${ARMS:-none asha}; do
    mkdir -p "$arm" && cd "$arm"
    tool=(--tool=ray --num_cpus=2 --cpus_per_trial=1)
    [ "$arm" = asha ] && tool+=(--scheduler=asha --grace_period=2 --reduction_factor=2)
    [ "$arm" = hyperopt ] && tool=(--tool=hyperopt)  # the same trials one after another, in one process
    echo "== $arm: start $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
    python "$repo/run_hyper.py" "${tool[@]}" --model=GRU4Rec --dataset=ml-100k --algo=exhaustive \
        --params_file="$here/ml-100k.hyper" --config_files="$here/ml-100k.yaml" --output_file=hyper.result \
        > search.log 2>&1 &
    search=$!
    start=$(date +%s.%N)
    # CPU of the whole process tree (the search, Ray's daemons and every trial worker).
    python "$here/cputree.py" "$search"
    wait "$search"
    echo "== $arm: exit $?, wall $(python -c "print(round($(date +%s.%N) - $start, 1))") s"
    grep -v -E "FutureWarning|GradScaler|pkg_resources" search.log
    echo "== $arm: end $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
    cd ..
done
