# Sourced on a lent GPU machine (benchmarks/gpu.sh, pipelines/real_speech/gpu.sh): its image has torch,
# transformers, typer and matplotlib but no package index, so the rest comes from the carried .gpu_wheels/
# (`make gpu-wheels`); this checkout goes on PYTHONPATH and an `hff-cache` command on PATH. Sets $py.
gpu_env() {  # gpu_env REPO
  local repo="$1"
  py="$(command -v python3 || command -v python)"
  if ! "$py" -c "import zarr, numcodecs, jiwer, soundfile, soxr" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --find-links "$repo/.gpu_wheels" \
      zarr numcodecs donfig google-crc32c jiwer rapidfuzz soundfile soxr
  fi
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  if ! command -v hff-cache > /dev/null; then  # the checkout is not installed there
    mkdir -p /tmp/hff-bin
    printf '#!/bin/sh\nexec %s -m hff_cache "$@"\n' "$py" > /tmp/hff-bin/hff-cache
    chmod +x /tmp/hff-bin/hff-cache
    export PATH="/tmp/hff-bin:$PATH"
  fi
}
