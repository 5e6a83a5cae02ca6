#!/usr/bin/env bash
# LibriSpeech subset recipe (3 speakers, ~75 min; see ../shared/data/README.md), icefall-style stages.
#
#   pipelines/librispeech_subset/run.sh                      # every stage
#   pipelines/librispeech_subset/run.sh --stage 3 --stop-stage 3 --epochs 10
#
# Each stage calls only the `hff-cache` CLI and leaves a done-marker ($exp/.done/stage-N); a finished
# stage is skipped on a rerun (delete its marker to redo it). Extraction and training resume on their own.
#
#   0  manifests: train = speakers 4088 + 4406, valid = 5652 (an unseen speaker); and a per-speaker split
#      of all 3 speakers (every 5th utterance held out) for speaker identification
#   1  extract: faster-whisper:base, all 7 hidden states, fp16 (one cache per manifest)
#   2  phone labels from the Montreal Forced Aligner TextGrids (stress stripped, silences dropped)
#   3  character ASR (CTC) with fusion last / weighted / hierarchical: same downstream, same budget
#   4  phone recognition (CTC over phones) with last / hierarchical
#   5  speaker identification. It needs train and valid from the SAME speakers (a classifier cannot name
#      a speaker it never saw), so it uses the per-speaker utterance split of stage 0, not the ASR split.
#   6  layer probe: the same small head on each hidden state alone
#   7  summary table of every run
set -euo pipefail

stage=0
stop_stage=7
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
data="${DATA:-$repo/../shared/data/librispeech-subset}"
exp="${EXP:-$repo/runs/librispeech_subset}"
model="faster-whisper:base"
epochs=20          # per training run
probe_epochs=10    # per probed layer
threads=0          # torch threads for training (0: torch's default; 1 can win on a busy shared CPU)
extra=()           # after --: passed to every `hff-cache train` (e.g. -- --batch-frames 20000)

while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage="$2"; shift 2 ;;
    --stop-stage) stop_stage="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --exp) exp="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    --probe-epochs) probe_epochs="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v hff-cache >/dev/null || { echo "hff-cache is not on PATH (source .venv/bin/activate)" >&2; exit 2; }
mkdir -p "$exp/.done" "$exp/manifests" "$exp/caches" "$exp/labels"
source "$here/../stages.sh"  # log, run_stage, done_stage, train
caches="$exp/caches"

if run_stage 0 "manifests"; then
  hff-cache manifest "$data" --speakers 4088,4406 --out "$exp/manifests/train.jsonl"
  hff-cache manifest "$data" --speakers 5652 --out "$exp/manifests/valid.jsonl"
  hff-cache manifest "$data" --holdout 5 --take rest --out "$exp/manifests/spk_train.jsonl"
  hff-cache manifest "$data" --holdout 5 --take holdout --out "$exp/manifests/spk_valid.jsonl"
  done_stage 0
fi

if run_stage 1 "extract ($model)"; then
  for split in train valid spk_train spk_valid; do
    hff-cache extract --model "$model" --data "$exp/manifests/$split.jsonl" --out "$caches/$split.zarr" \
      --no-progress
  done
  hff-cache info "$caches/train.zarr"
  done_stage 1
fi

if run_stage 2 "phone labels"; then
  hff-cache labels phones --alignments "$data/alignment" --out "$exp/labels/phones.jsonl"
  done_stage 2
fi

if run_stage 3 "character ASR: last / weighted / hierarchical"; then
  for fusion in last weighted hierarchical; do
    train "asr_$fusion" --cache "$caches/train.zarr" --valid-cache "$caches/valid.zarr" --fusion "$fusion"
  done
  done_stage 3
fi

if run_stage 4 "phone recognition"; then
  for fusion in last hierarchical; do
    train "phones_$fusion" --task phones --labels "$exp/labels/phones.jsonl" --cache "$caches/train.zarr" \
      --valid-cache "$caches/valid.zarr" --fusion "$fusion"
  done
  done_stage 4
fi

if run_stage 5 "speaker identification (per-speaker utterance split)"; then
  for fusion in last hierarchical; do
    train "speaker_$fusion" --task classify:speaker --cache "$caches/spk_train.zarr" \
      --valid-cache "$caches/spk_valid.zarr" --fusion "$fusion"
  done
  done_stage 5
fi

if run_stage 6 "layer probe"; then
  hff-cache probe --cache "$caches/train.zarr" --valid-cache "$caches/valid.zarr" --out "$exp/probe" \
    --epochs "$probe_epochs" --threads "$threads"
  done_stage 6
fi

if run_stage 7 "summary"; then
  runs=()
  for r in asr_last asr_weighted asr_hierarchical phones_last phones_hierarchical speaker_last \
           speaker_hierarchical probe; do
    [ -e "$exp/$r" ] && runs+=("$exp/$r")
  done
  hff-cache summary --markdown "${runs[@]}" | tee "$exp/summary.md"
fi
