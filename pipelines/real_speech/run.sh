#!/usr/bin/env bash
# Real speech at a real budget (issue 12): LibriSpeech subset + speechocean762, two domains, five tasks,
# two Whisper encoders, every method. icefall-style stages; CLI calls only.
#
#   pipelines/real_speech/run.sh                               # every stage
#   pipelines/real_speech/run.sh --stage 3 --stop-stage 3      # one stage
#   pipelines/real_speech/run.sh --encoders tiny.en            # one encoder
#
# Every stage leaves a done-marker ($exp/.done/stage-N[-ENC]); a finished stage is skipped on a rerun, and
# every run inside a stage resumes where it stopped (extraction skips committed utterances, training runs
# continue from checkpoints/last with --resume). So the same command, run again in a later session,
# continues the work. Delete a marker to redo its stage.
#
#   0  manifests. train = LibriSpeech 4088 + 4406 and speechocean762 minus 15 held-out speakers;
#      valid = LibriSpeech 5652 and the 15 held-out speakers (balanced for gender x age group).
#      A `corpus` field tags each utterance's domain, so every number is reported per domain.
#   1  extract train and valid once per encoder (faster-whisper:tiny.en, faster-whisper:base), fp16.
#   2  phone labels: one phone set across both corpora (MFA TextGrids + speechocean762's own phones,
#      stress digits stripped, silences dropped).
#   3  character ASR from the cache: last / weighted / hierarchical / size-matched control, seeds.
#   4  per-domain evaluation of every finished ASR run (RUN/eval/valid/metrics.json, by corpus).
#   9  summary table of every run.
set -euo pipefail

stage=0
stop_stage=9
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
shared="${SHARED:-$repo/../shared/data}"
exp="${EXP:-$repo/runs/real_speech}"
encoders="tiny.en base"
seeds="0 1"
epochs=20
threads=0          # torch threads for training and extraction (0: torch's default)
extra=()           # after --: passed to every `hff-cache train`

while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage="$2"; shift 2 ;;
    --stop-stage) stop_stage="$2"; shift 2 ;;
    --exp) exp="$2"; shift 2 ;;
    --encoders) encoders="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v hff-cache >/dev/null || { echo "hff-cache is not on PATH (source .venv/bin/activate)" >&2; exit 2; }
libri="$shared/librispeech-subset"
so="$shared/speechocean762-train"
mkdir -p "$exp/.done" "$exp/manifests" "$exp/labels" "$exp/caches"
log() { echo "$(date '+%F %T') $*"; }

# run_stage N NAME [KEY]: true when stage N is inside --stage..--stop-stage and its marker is missing
run_stage() {
  local n="$1" name="$2" marker="$exp/.done/stage-$1${3:+-$3}"
  if [ "$stage" -le "$n" ] && [ "$stop_stage" -ge "$n" ]; then
    if [ -f "$marker" ]; then log "stage $n ($name): done already ($marker)"; return 1; fi
    log "stage $n: $name"; return 0
  fi
  return 1
}
done_stage() { date '+%F %T' > "$exp/.done/stage-$1${2:+-$2}"; }

train() {  # train RUN [options...]: one run directory, resumed when interrupted, skipped when finished
  local run="$exp/$1"; shift
  if [ -f "$run/metrics.json" ]; then log "  $run: finished already"; return; fi
  local resume=()
  [ -f "$run/config.json" ] && resume=(--resume)
  log "  train $run"
  hff-cache train --out "$run" --epochs "$epochs" --threads "$threads" "${resume[@]}" "$@" "${extra[@]}"
}

# the size-matched control: `last` with a downstream as wide as makes its parameters equal hierarchical's
control_width() { case "$1" in tiny.en) echo 480 ;; base) echo 560 ;; *) echo 256 ;; esac; }

m="$exp/manifests"
if run_stage 0 "manifests"; then
  hff-cache manifest "$libri" --speakers 4088,4406 --tag corpus=librispeech --out "$m/libri_train.jsonl"
  hff-cache manifest "$libri" --speakers 5652 --tag corpus=librispeech --out "$m/libri_valid.jsonl"
  for take in rest holdout; do
    hff-cache manifest "$so/train.jsonl" --holdout-speakers 15 --balance gender,age_group --take "$take" \
      --tag corpus=speechocean762 --out "$m/so_$take.jsonl"
  done
  hff-cache manifest "$m/libri_train.jsonl" "$m/so_rest.jsonl" --out "$m/train.jsonl"
  hff-cache manifest "$m/libri_valid.jsonl" "$m/so_holdout.jsonl" --out "$m/valid.jsonl"
  done_stage 0
fi

for enc in $encoders; do
  if run_stage 1 "extract ($enc)" "$enc"; then
    for split in train valid; do
      hff-cache extract --model "faster-whisper:$enc" --data "$m/$split.jsonl" \
        --out "$exp/caches/$enc/$split.zarr" --no-progress
    done
    hff-cache info "$exp/caches/$enc/train.zarr"
    done_stage 1 "$enc"
  fi
done

if run_stage 2 "phone labels (one phone set, both corpora)"; then
  hff-cache labels phones --alignments "$libri/alignment" --jsonl "$so/phones.jsonl" --out "$exp/labels/phones.jsonl"
  done_stage 2
fi

for enc in $encoders; do
  c="$exp/caches/$enc"
  if run_stage 3 "character ASR from the cache ($enc)" "$enc"; then
    for seed in $seeds; do
      for fusion in last weighted hierarchical; do
        train "$enc/asr_$fusion-s$seed" --cache "$c/train.zarr" --valid-cache "$c/valid.zarr" --fusion "$fusion" \
          --seed "$seed"
      done
      train "$enc/asr_last-wide-s$seed" --cache "$c/train.zarr" --valid-cache "$c/valid.zarr" --fusion last \
        --width "$(control_width "$enc")" --seed "$seed"
    done
    done_stage 3 "$enc"
  fi
done

for enc in $encoders; do
  if run_stage 4 "per-domain evaluation ($enc)" "$enc"; then
    for run in "$exp/$enc"/asr_*; do
      [ -f "$run/metrics.json" ] || continue
      hff-cache evaluate "$run" --cache "$exp/caches/$enc/valid.zarr" --group-by corpus --json > /dev/null
    done
    done_stage 4 "$enc"
  fi
done

if run_stage 9 "summary"; then
  for enc in $encoders; do
    [ -d "$exp/$enc" ] || continue
    hff-cache summary --markdown "$exp/$enc"/*/ | tee "$exp/summary_$enc.md"
  done
fi
