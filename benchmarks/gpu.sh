#!/usr/bin/env bash
# `moderator bench` on a GPU machine that has PyTorch and transformers but no Kafka, Redis or
# network (an H200 is the target): for ViT-B/32, ViT-B/16 and ViT-L/14 in bf16, the reference
# pipeline, the engine, the ceiling, and the worker fed from an in-process queue instead of Kafka
# (each report says so). One JSON report and one text table per architecture.
#
#   bash benchmarks/gpu.sh            # reports in $OUT if set, else benchmarks/results/
#
# Python packages such a machine lacks (pydantic-settings, structlog, kafka-python, redis, ...)
# travel as wheels in .whl/ (benchmarks/gpu_wheels.sh downloads them where PyPI is reachable); when
# .whl/ holds wheels and the packages are missing, they are installed into a private directory first.
#
# Overrides, for trying it elsewhere (tests run it on the CPU with the tiny model):
#   PYTHON (python3), BENCH_DEVICE (cuda), BENCH_DTYPE (bfloat16), BENCH_ARCHS ("ViT-B/32 ViT-B/16 ViT-L/14"),
#   BENCH_BATCH (256), BENCH_ARGS (more `moderator bench` flags, e.g. "--quick").
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python=${PYTHON:-python3}
if ! "$python" -c "import pydantic_settings, structlog, kafka, redis" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" - <<'PY'
import torch
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY
status=0
for arch in ${BENCH_ARCHS:-ViT-B/32 ViT-B/16 ViT-L/14}; do
  name=gpu-${arch//\//-}
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  if ! "$python" -m moderator.cli bench --feed queue --arch "$arch" --device "${BENCH_DEVICE:-cuda}" \
      --dtype "${BENCH_DTYPE:-bfloat16}" --batch "${BENCH_BATCH:-256}" --json "$out/$name.json" ${BENCH_ARGS:-} \
      >"$out/$name.txt"; then
    echo "benchmark of $arch failed" >&2
    status=1
  fi
  cat "$out/$name.txt"
done
exit $status
