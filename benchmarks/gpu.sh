#!/usr/bin/env bash
# The GPU check (benchmarks/gpu.py): at most 8 minutes on one H100/H200; `--dry-run` runs it on CPU with tiny
# random models (CI: tests/test_gpu_check.py). Results: $OUT/gpu.md and $OUT/gpu.jsonl (OUT defaults to .).
#
#   bash benchmarks/gpu.sh              # on the lent machine (the device tool sets $OUT)
#   bash benchmarks/gpu.sh --dry-run
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-.}"
source "$here/../pipelines/gpu_env.sh"
gpu_env "$(cd "$here/.." && pwd)"
timeout 480 "$py" "$here/gpu.py" --out "$out" "$@"
