#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on the GPU machine (no network there), downloaded here into .whl/
# (git-ignored through .git/info/exclude: `echo /.whl/ >> .git/info/exclude`; never commit wheels).
# The GPU image (Python 3.12, torch 2.11 + CUDA, transformers, accelerate, timm, scipy, pyarrow, pandas, xxhash,
# fsspec, huggingface-hub, requests) lacks datasets, evaluate, dill and multiprocess; its peft is not pinned to
# ours. Together about 1.8 MB. Carry them with the device tool's `carry: [".whl"]`.
#
#   bash benchmarks/gpu_wheels.sh            # then: gpu_check.sh installs .whl/*.whl into /tmp/site
#
# If the device's pyarrow is older than 24 or its fsspec newer than 2026.9.0 (datasets 5.2.0's bounds; gpu_check.sh
# prints both), add them: WITH_PYARROW=1 bash benchmarks/gpu_wheels.sh (pyarrow's wheel is ~45 MB of the 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PKGS=(peft==0.21.2 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19)
if [ "${WITH_PYARROW:-0}" = 1 ]; then PKGS+=(pyarrow==26.0.1 fsspec==2026.9.0); fi
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}"
ls -l .whl
