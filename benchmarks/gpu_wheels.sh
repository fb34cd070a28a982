#!/usr/bin/env bash
# Download, into .whl/, the wheels of the project's dependencies that the GPU machines' image does
# not have (it has torch, transformers, numpy, pillow, pyyaml, prometheus-client), for Python 3.12 on
# x86-64 Linux, at the versions installed here. Run where PyPI is reachable; then run
# benchmarks/gpu.sh on the GPU machine with .whl/ beside it (it is ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
packages="pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv structlog kafka-python redis"
pins=$("$python" - $packages <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
mkdir -p .whl
# shellcheck disable=SC2086  # pins is a list
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl $pins
ls .whl
