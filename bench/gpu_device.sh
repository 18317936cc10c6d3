#!/usr/bin/env bash
# bench/gpu.py on a machine whose Python has torch (and CUDA) but not this project's other dependencies, such as
# the device machine lent through the session's `device` tool (Python 3.12, no network there).
#
#   bash bench/gpu_device.sh fetch          # here, with network: wheels of bench/gpu_wheels.txt into .whl/
#   bash bench/gpu_device.sh run [ARGS]     # there: install .whl/ into /tmp/site, run bench/gpu.py ARGS
#
# With the device tool: run(command="bash bench/gpu_device.sh run", carry=[".whl"], timeout_s=560). The JSON is
# written to $OUT/gpu.json after every part (and the log to $OUT/gpu.log), so a run stopped at its limit still
# brings back what it measured. `--parts topk,stage0` reruns some parts only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

case "${1:-}" in
  fetch)
    rm -rf .whl
    # WHEEL_PYTHON: the Python there (3.12 on the lent device machine)
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
      --implementation cp \
      --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d .whl -r bench/gpu_wheels.txt
    du -sh .whl
    ;;
  run)
    shift
    if ! ls .whl/*.whl > /dev/null 2>&1; then
      echo "no wheels in .whl/: run 'bash bench/gpu_device.sh fetch' where there is network, and carry .whl" >&2
      exit 2
    fi
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    out=${OUT:-runs/gpu}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    # 530 s: bench/gpu.py's own budget is 8 minutes; stop before a 10-minute command limit whatever happens
    timeout 530 "$PY" bench/gpu.py --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
    ;;
  *)
    echo "usage: bash bench/gpu_device.sh fetch|run [bench/gpu.py arguments]" >&2
    exit 2
    ;;
esac
