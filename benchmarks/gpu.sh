#!/usr/bin/env bash
# One GPU lease: install what the machine lacks, run a plan of studies, pack the results into $OUT.
#
#   bash benchmarks/gpu.sh [MINUTES] [PLAN]     # on the device machine; defaults 8.3, benchmarks/plans/gpu.plan
#
# Needs, carried with the working tree (`carry: [".gpu"]`; .gitignore ignores it): .gpu/whl (wheels of
# recbole 1.2.1 and the few of its dependencies the machine's image lacks, pandas 2.3 among them) and
# .gpu/data/amazon-beauty (the plan's ../shared/data, which does not travel). Made here with:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
#     recbole==1.2.1 colorlog==4.7.2 texttable thop pandas==2.3.3 pytz tzdata
#   mkdir -p .gpu/data && cp -r ../shared/data/amazon-beauty .gpu/data/ Runs start for MINUTES - 2.3, and whatever is still
# running at MINUTES is stopped, so the tables come back inside a 10-minute command.
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-8.3}
plan=${2:-benchmarks/plans/gpu.plan}
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
python=${PYTHON:-python3}
wheels=${WHEELS:-.gpu/whl}
if [ -d "$wheels" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
"$python" -c "import torch, pandas, numpy, recbole, recbole_t2diff.quick_start; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU', 'pandas', pandas.__version__, 'numpy', numpy.__version__)" || exit 1
# The plan names ../shared/data (this project's layout); here it is the carried .gpu/data.
if [ ! -d ../shared/data ] && [ -d .gpu/data ]; then
  mkdir -p ../shared && ln -sfn "$PWD/.gpu/data" ../shared/data
fi
"$python" -m benchmarks.batch "$plan" --jobs="${JOBS:-15}" --abort_if_first_fail=8 \
  --stop_starting_after="$(awk "BEGIN { print $minutes - 2.3 }")" --stop_after="$minutes" 2>&1 | tee "$out/batch.log"
tar czf "$out/results.tgz" $(sed -n 's/.*--out=\([^ ]*\).*/\1/p' "$plan" | sort -u) 2>/dev/null
ls -la "$out"
