#!/usr/bin/env bash
# The GPU check (benchmarks/gpu.py): at most 8 minutes on one H100/H200; `--dry-run` runs it on CPU with tiny
# random models (CI: tests/test_gpu_check.py). Results: $OUT/gpu.md and $OUT/gpu.jsonl (OUT defaults to .).
#
#   bash benchmarks/gpu.sh              # on the lent machine (the device tool sets $OUT)
#   bash benchmarks/gpu.sh --dry-run
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-.}"
py="$(command -v python3 || command -v python)"
# The lent machine has torch but no package index: install the rest from the carried .gpu_wheels/
# (`make gpu-wheels`, then run with carry [".gpu_wheels"]).
if ! "$py" -c "import zarr, numcodecs, jiwer, soundfile, soxr" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --find-links "$here/../.gpu_wheels" \
    zarr numcodecs donfig google-crc32c jiwer rapidfuzz soundfile soxr
fi
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 480 "$py" "$here/gpu.py" --out "$out" "$@"
