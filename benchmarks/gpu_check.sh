#!/usr/bin/env bash
# The first GPU run (issue 15) as one command: (a) tests/test_on_device.py on cuda, (b) benchmarks/run_cost.py
# --device cuda at DINOv2-L size with Mask2Former, 512² crops, batch 4, bf16 (freeze, LoRA r=16, full, FisherTune,
# FisherTune with host-offloaded accumulators and Rein where this checkout has them, and last FisherTune with the
# per-sample Fisher, the paper configs' mode), (c) EVA02-L through timm:
# build, wrap with FisherTune, one training step, (d) benchmarks/sddmm_crossover.py on the device: the active density
# at which a Linear layer's values' gradient is cheaper as dense dW + gather than as SDDMM (the value for
# SDDMM_MAX_DENSITY["cuda"] in tuner/sparse_delta.py, unmeasured until then). run_cost's table now leads with the
# whole-run time at the paper's stage proportions (10k:2k:28k). Results as JSON + Markdown under OUTDIR. Budget:
# < 10 min on one H200 (each part has its own time limit: 100 + 400 + 60 + 90 s, plus the wheel install).
#
#   bash benchmarks/gpu_wheels.sh                       # here, once: the missing wheels into .whl/
#   device run, carry [".whl"]:  bash benchmarks/gpu_check.sh $OUT
#   bash benchmarks/gpu_check.sh /tmp/gpu_smoke --cpu-smoke   # the same script at tiny sizes on a CPU machine
#
# GPU_CHECK_NO_WHEELS=1 skips installing .whl/ (the CPU smoke run uses the local environment).
# Extra arguments go to benchmarks/gpu_check.py (--fisher-mode per_sample, --stages 2 3 3, --no-profile, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: gpu_check.sh OUTDIR [--cpu-smoke] [gpu_check.py options]}
shift
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${GPU_CHECK_NO_WHEELS:-0}" != 1 ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'PYEOF'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "pyarrow", "fsspec", "timm", "scipy"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{name}: NOT IMPORTABLE ({type(e).__name__}: {e})")
PYEOF
mkdir -p "$OUTDIR"
exec "$PY" benchmarks/gpu_check.py "$OUTDIR" "$@"
