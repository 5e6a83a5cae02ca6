#!/usr/bin/env bash
# Online methods side by side on real speech (LibriSpeech subset, faster-whisper:base, CPU):
# hff-frozen, hff-adapters, adapters, bitfit, full -- plus the cached hierarchical model on the same
# utterances -- with the same head, schedule and batches of audio. Each run writes its own run directory
# (metrics.json: wer, trainable_encoder_params, step_time_ms, epoch_seconds, peak_rss_mb), then
# `transcribe` re-decodes the validation set from the best checkpoint as a check.
#
#   bash benchmarks/online_methods.sh [OUT] [EPOCHS] [TRAIN_UTTS] [VALID_UTTS]
set -euo pipefail
OUT=${1:-runs/online}
EPOCHS=${2:-5}
NTRAIN=${3:-48}
NVALID=${4:-24}
DATA=${DATA:-../shared/data/librispeech-subset}
MODEL=${MODEL:-faster-whisper:base}
mkdir -p "$OUT"

# train on speakers 4088 + 4406, validate on 5652; N utterances evenly spaced in id order
hff-cache manifest "$DATA" --speakers 4088,4406 -o "$OUT/train_all.jsonl"
hff-cache manifest "$DATA" --speakers 5652 -o "$OUT/valid_all.jsonl"
python - "$OUT" "$NTRAIN" "$NVALID" <<'PY'
import json, sys
from hff_cache.intake.manifests import load_intake
from hff_cache.intake.selection import spread_subset
out, n = sys.argv[1], {"train": int(sys.argv[2]), "valid": int(sys.argv[3])}
for split in ("train", "valid"):
    rows = [json.loads(line) for line in open(f"{out}/{split}_all.jsonl")]
    keep = {u.id for u in spread_subset(load_intake(f"{out}/{split}_all.jsonl"), n[split])}
    with open(f"{out}/{split}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["id"] in keep)
PY

RECIPE=(--epochs "$EPOCHS" --eval-every "$EPOCHS" --lr 1e-3 --seed 0)  # validate once, at the end (best = last)

# the cached reference: extract once, train the same hierarchical model (20 s of audio = 1000 frames/batch)
hff-cache extract --model "$MODEL" --data "$OUT/train.jsonl" --out "$OUT/train.zarr" --no-progress
hff-cache extract --model "$MODEL" --data "$OUT/valid.jsonl" --out "$OUT/valid.zarr" --no-progress
hff-cache train --cache "$OUT/train.zarr" --valid-cache "$OUT/valid.zarr" --out "$OUT/cached-hierarchical" \
    --batch-frames 1000 "${RECIPE[@]}" --force

for method in hff-frozen hff-adapters adapters bitfit full; do
  hff-cache train --online --model "$MODEL" --data "$OUT/train.jsonl" --valid-data "$OUT/valid.jsonl" \
      --method "$method" --out "$OUT/$method" --batch-seconds 20 "${RECIPE[@]}" --force
done

for run in cached-hierarchical hff-adapters; do
  hff-cache transcribe "$OUT/$run" --data "$OUT/valid.jsonl" > "$OUT/$run/transcribe_valid.tsv"
done
