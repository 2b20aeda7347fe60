#!/usr/bin/env bash
# The GPU comparison of docs/benchmarks.md in one command (at most 8 minutes, compiles included):
#
#   scripts/gpu_benchmark.sh OUT_DIR [options of scripts/gpu_benchmark.py]
#       installs the wheels in .whl/ (if any) into a temporary directory, then runs
#       scripts/gpu_benchmark.py, which writes OUT_DIR/gpu_benchmark.json and .md
#   scripts/gpu_benchmark.sh --fetch-wheels [NAME==VERSION ...]
#       on a machine with pip: saves the pure-Python packages the GPU machine lacks (by
#       default the ml-collections that constraints.txt pins) into .whl/, to copy along
#
# PYTHON names the interpreter (default python3).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

if [[ ${1:-} == --fetch-wheels ]]; then
  shift
  if (($# == 0)); then
    set -- "$(grep -i '^ml[-_]collections==' "$repo/constraints.txt")"
  fi
  "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$repo/.whl" "$@"
  exit
fi

if (($# == 0)) || [[ $1 == -* ]]; then
  echo "usage: $0 OUT_DIR [options of scripts/gpu_benchmark.py] | --fetch-wheels [NAME==VERSION ...]" >&2
  exit 2
fi
out=$1
shift

wheels=("$repo"/.whl/*.whl)
if [[ -e ${wheels[0]} ]]; then
  site=${TMPDIR:-/tmp}/jaxkd-gpu-benchmark-wheels
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${wheels[@]}"
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$python" "$repo/scripts/gpu_benchmark.py" --out-dir "$out" "$@"
