#!/usr/bin/env bash
# The paper's table for faster-whisper:base on a lent GPU (issue 12), in at most 10 minutes: recipe stage 7 --
# the cached last / hierarchical / weighted / size-matched control and online hff-adapters / full / hff-frozen /
# adapters / bitfit, and hff-adapters' second seed -- on the recipe's 1-hour subset with its validation set, 20
# epochs each, many runs at once.
#
#   bash pipelines/real_speech/gpu.sh --pack       # here, after the recipe's stage 0: what travels, in .gpu_table/
#   device run: bash pipelines/real_speech/gpu.sh  # carry [".gpu_wheels", ".gpu_table"], timeout_s 600
#   bash pipelines/real_speech/gpu.sh --dry-run --manifests DIR  # CPU, 1 epoch: CI's check (tests/test_gpu_table.py)
#
# The lent machine takes 64 MiB with the code, so what travels is the encoder alone (`hff-cache export-encoder`,
# 39 MiB, the same weights) and the audio as 16 kbit/s Opus (`hff-cache manifest --copy-audio`, ~12 MiB).
# There: the audio is decoded back to FLAC in parallel (training reads it every epoch), extracted once in bf16
# (stage 1), stage 7 runs --jobs runs at once, stage 6 evaluates each per domain, stage 10 summarises.
# Back in $OUT: gpu_table.md (the summary), gpu_table.tar.gz (every run's config, log, metrics and evaluation).
# The rows are paired with each other (one audio copy, one cache), not with this machine's rows from the
# original audio.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
pack="$repo/.gpu_table"
manifests="$repo/runs/real_speech/manifests"
exp="${TMPDIR:-/tmp}/gpu_table"
out="${OUT:-.}"
mode=run epochs=20 jobs=10 budget=360 bitrate=16 seeds="0 1"

while [ $# -gt 0 ]; do
  case "$1" in
    --pack) mode=pack; shift ;;
    --dry-run) mode=dry; epochs=1 jobs=3 seeds=0; shift ;;
    --manifests) manifests="$2"; shift 2 ;;  # the recipe's stage-0 folder (train_1h.jsonl, valid.jsonl)
    --pack-dir) pack="$2"; shift 2 ;;
    --exp) exp="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --bitrate) bitrate="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;  # seconds for stage 7 (extraction before, evaluation after: ~4 min)
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

pack_here() {  # what travels: the encoder alone and the subset's and validation's audio, compact
  for split in train_1h valid; do
    [ -f "$manifests/$split.jsonl" ] || { echo "$manifests/$split.jsonl: missing; run the recipe's stage 0" >&2; exit 2; }
  done
  hff-cache export-encoder faster-whisper:base --out "$pack/home/models/faster-whisper-base"
  for split in train_1h valid; do
    hff-cache manifest "$manifests/$split.jsonl" --copy-audio "$pack/audio/$split" --audio-format opus \
      --bitrate "$bitrate" --jobs 2 --out "$pack/$split.jsonl"
  done
  # the device takes 64 MiB in all: this folder, .gpu_wheels (`make gpu-wheels`) and the checkout's files
  local bytes=$(( $(du -sb "$pack" | cut -f1) + $(du -sb "$repo/.gpu_wheels" 2>/dev/null | cut -f1 || echo 0) \
    + $(git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cat) | wc -c) ))
  echo "what travels: $((bytes / 1048576)) MiB of the device's 64 (this folder, .gpu_wheels, the checkout)"
  if [ "$bytes" -gt $((62 * 1048576)) ]; then
    echo "over 62 MiB: pack again with a lower --bitrate (now $bitrate kbit/s)" >&2; exit 1
  fi
}

run_there() {  # on the lent machine (or, for --dry-run, here)
  local m="$exp/manifests" rs=(bash "$here/run.sh" --exp "$exp" --encoders base --online-encoders base --seeds "$seeds")
  mkdir -p "$m" "$exp/.done"
  for split in train_1h valid; do  # Opus -> FLAC once, in parallel, so no epoch decodes Opus
    hff-cache manifest "$pack/$split.jsonl" --copy-audio "$exp/audio/$split" --audio-format flac --jobs "$(nproc)" \
      --out "$m/$split.jsonl"
  done
  cp "$m/train_1h.jsonl" "$m/train.jsonl"  # stage 1 extracts train: here the subset is all there is
  date '+%F %T' > "$exp/.done/stage-0"
  # faster-whisper:base resolves to the carried encoder where its package is missing (there, not here)
  [ "$mode" = run ] && export HFF_CACHE_HOME="$pack/home"
  "${rs[@]}" --stage 1 --stop-stage 1
  # the table; cut at the budget so the evaluation and summary of what finished still come back
  timeout "$budget" "${rs[@]}" --stage 7 --stop-stage 7 --epochs "$epochs" --jobs "$jobs" --threads 1 \
    || echo "stage 7 stopped (exit $?): the summary lists the runs that finished; log.csv has the rest"
  "${rs[@]}" --stage 6 --stop-stage 6
  "${rs[@]}" --stage 10 --stop-stage 10
}

collect() {
  mkdir -p "$out"
  cp "$exp/report/summary_base.md" "$out/gpu_table.md" 2>/dev/null || echo "no summary" > "$out/gpu_table.md"
  local kept=()
  for d in base logs report; do [ -d "$exp/$d" ] && kept+=("$d"); done
  (cd "$exp" && find "${kept[@]}" -type f -not -path '*/checkpoints/*' \( -name '*.json' -o -name '*.csv' \
    -o -name '*.md' -o -name '*.png' -o -name '*.log' \) -print0 | tar -czf "$out/gpu_table.tar.gz" --null -T -)
  echo "$out/gpu_table.md, $out/gpu_table.tar.gz"
}

case "$mode" in
  pack) pack_here ;;
  dry) pack="$exp/pack"; pack_here; run_there; collect ;;
  run)
    source "$repo/pipelines/gpu_env.sh"
    gpu_env "$repo"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    run_there; collect ;;
esac
