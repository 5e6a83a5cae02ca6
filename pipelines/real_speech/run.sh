#!/usr/bin/env bash
# Real speech at a real budget (issue 12): LibriSpeech subset + speechocean762, two domains, five tasks,
# two Whisper encoders, every method. icefall-style stages; CLI calls only.
#
#   pipelines/real_speech/run.sh                               # every stage
#   pipelines/real_speech/run.sh --stage 3 --stop-stage 3      # one stage
#   pipelines/real_speech/run.sh --encoders tiny.en            # one encoder
#   pipelines/real_speech/run.sh --jobs 4                      # up to 4 training runs at once per stage
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
#   3  character ASR from the cache: last / weighted / hierarchical / size-matched control (seed 0), and
#      further seeds for the fusions whose rows lie within a point of each other (weighted, hierarchical).
#   4  the other tasks from the same cache: phones (CTC), speaker id (speechocean762's speakers, each
#      speaker's utterances split 4:1), gender and child/adult (speaker-disjoint: train vs held-out speakers).
#      Per task, seed 0: the per-layer probe (which layer serves which task; its top layer is `last`) and
#      hierarchical, both at $task_epochs epochs, so every probe row is a single-layer control of the same
#      budget, and `weighted` for the speaker traits (whose best layer is not the top one); then the ASR
#      probe. About 2.5 h of one core on tiny.en.
#   5  the same with seed 1 (without the ASR probe): the seed spread the fusion-against-best-layer claim needs.
#   6  per-domain evaluation of every finished run not yet evaluated (RUN/eval/valid/metrics.json, groups by
#      corpus); no marker, so a later pass evaluates the runs finished since.
#   7  the paper's table on a 1-hour subset, per encoder (--online-encoders): the cached last / hierarchical /
#      weighted / size-matched control and online hff-adapters, full, hff-frozen, adapters, bitfit, all on the
#      same subset (paired rows); then hff-adapters' further seeds. gpu.sh runs this stage for base on a lent
#      GPU, --jobs at once.
#      Every method on all 3.4 hours does not fit this 2-core machine (docs/results.md); --online-data full
#      runs them on all of it where it does.
#   8  Whisper at its 30 s window: the 1-hour subset and valid extracted again with --whisper-window 30s
#      (6x the encoder work), last and hierarchical trained on them, paired with stage 7's cached rows.
#   9  partial caching on the 1-hour subset (--online-encoders): hff-adapters --from-layer K for K = L/2 and 0,
#      read from the same cache; K = L is stage 7's cached hierarchical row, adapters everywhere its online row;
#      then the further seeds of both.
#  10  summary tables and figures (hff-cache summary) into $exp/report/.
#  11  cache v2 (issue 14): `hierarchical` on the 1-hour subset from fp16, then from train and valid
#      transcoded to tpcape, tpcape-int8 (its int8 prediction), tpcap and tpca (all 0.25 B/value), with the
#      same seeds (seed 0's fp16 row is stage 7's), so each codec row is paired with an fp16 row of the same
#      seed and utterances. --codecs picks which of them; `--seeds "2" --codecs tpcape` adds one more pair to
#      a finished stage (the stage's
#      marker is written only when it ran every codec).
#  12  gender's further seeds (--trait-seeds, default "2 3"): `hierarchical` and the probe of the best layer
#      that the gender probes so far found, the trait where fusion's gain was inside the seed spread after
#      stages 4-5's two seeds.
#  13  the speaker traits with the fusion started uniform (--top-init 0 --rung-gate-init none: every layer
#      weighted alike at the start, no gate on the lower ladder), `hierarchical` for speaker id, child/adult
#      and gender, --seeds; the default start is the top layer, where those traits are weakest.
#  14  base only, towards LibriSpeech 5652 below 35%: `last` with heavier SpecAugment (and dropout 0.3), with
#      subword units (bpe:256), with more context after the fusion (6 conv blocks of kernel 15; the lstm
#      downstream), and how WER grows with in-domain speech: `last` on 1/4, 1/2 and all of LibriSpeech's
#      50 training minutes alone, each for the all-data run's ~1,400 steps; then evaluates them per domain.
set -euo pipefail

stage=0
stop_stage=14
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
shared="${SHARED:-$repo/../shared/data}"
exp="${EXP:-$repo/runs/real_speech}"
encoders="tiny.en base"
seeds="0 1"
epochs=20
task_epochs=6   # stages 4-5: each probe layer and each non-ASR hierarchical run
trait_seeds="2 3"  # stage 12: gender's further seeds
online_encoders="tiny.en base"  # stage 7: the paper's table per encoder
online_data=1h                  # stage 7 trains on: 1h (an evenly spaced hour of train) | full
all_methods="hff-adapters full hff-frozen adapters bitfit"  # the paper's headline pair first
online_methods="$all_methods"
subset_utts=720                 # about 1 hour of the training data
all_codecs="tpcape tpcape-int8 tpcap tpca"
codecs="$all_codecs"            # stage 11: the 0.25 B/value codecs paired with fp16
threads=0          # torch threads for training and extraction (0: torch's default)
jobs=1             # training runs at once within a stage (a GPU host: several; see gpu.sh)
extra=()           # after --: passed to every `hff-cache train`

while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage="$2"; shift 2 ;;
    --stop-stage) stop_stage="$2"; shift 2 ;;
    --exp) exp="$2"; shift 2 ;;
    --encoders) encoders="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    --task-epochs) task_epochs="$2"; shift 2 ;;
    --trait-seeds) trait_seeds="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --online-encoders) online_encoders="$2"; shift 2 ;;
    --online-data) online_data="$2"; shift 2 ;;
    --online-methods) online_methods="$2"; shift 2 ;;
    --codecs) codecs="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v hff-cache >/dev/null || { echo "hff-cache is not on PATH (source .venv/bin/activate)" >&2; exit 2; }
libri="$shared/librispeech-subset"
so="$shared/speechocean762-train"
mkdir -p "$exp/.done" "$exp/manifests" "$exp/labels" "$exp/caches"
source "$here/../stages.sh"  # log, run_stage, done_stage, train

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
  # speaker identification: the training speakers' utterances, every 5th held out (both from the train cache)
  hff-cache manifest "$m/so_rest.jsonl" --holdout 5 --take rest --out "$exp/labels/speaker_train.jsonl"
  hff-cache manifest "$m/so_rest.jsonl" --holdout 5 --take holdout --out "$exp/labels/speaker_valid.jsonl"
  # base's online methods: an evenly spaced ~1 hour of the training data (the cached rows use the same ids)
  hff-cache manifest "$m/train.jsonl" --max-utts "$subset_utts" --out "$m/train_1h.jsonl"
  done_stage 0
fi

for enc in $encoders; do
  if run_stage 1 "extract ($enc)" "$enc"; then
    for split in train valid; do
      hff-cache extract --model "faster-whisper:$enc" --data "$m/$split.jsonl" \
        --out "$exp/caches/$enc/$split.zarr" --threads "$threads" --no-progress
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
    asr=(--cache "$c/train.zarr" --valid-cache "$c/valid.zarr")
    for fusion in hierarchical last weighted; do  # the headline row first, so a cut-short budget has it
      train "$enc/asr_$fusion-s0" "${asr[@]}" --fusion "$fusion" --seed 0
    done
    train "$enc/asr_last-wide-s0" "${asr[@]}" --fusion last --width "$(control_width "$enc")" --seed 0
    for seed in $seeds; do  # `last` lies 20 points behind on tiny.en: the close rows get the extra seeds
      [ "$seed" = 0 ] && continue
      for fusion in weighted hierarchical; do
        train "$enc/asr_$fusion-s$seed" "${asr[@]}" --fusion "$fusion" --seed "$seed"
      done
    done
    done_stage 3 "$enc"
  fi
done

task_args() {  # task_args TASK ENC: the options that give one non-ASR task its labels and caches
  local c="$exp/caches/$2"
  case "$1" in
    phones) echo --task phones --labels "$exp/labels/phones.jsonl" --cache "$c/train.zarr" --valid-cache "$c/valid.zarr" ;;
    speaker) echo --task classify:speaker --labels "$exp/labels/speaker_train.jsonl" \
      --valid-labels "$exp/labels/speaker_valid.jsonl" --cache "$c/train.zarr" --valid-cache "$c/train.zarr" ;;
    *) echo --task "classify:$1" --cache "$c/train.zarr" --valid-cache "$c/valid.zarr" ;;
  esac
}

probe() {  # probe RUN [options...]: every layer of one task; finished layers reused, an interrupted one resumed
  log "  probe $exp/$1"
  hff-cache probe --out "$exp/$1" --epochs "$task_epochs" --threads "$threads" "${@:2}" > /dev/null
}

# which layer serves which task, and does fusing them beat the best one: each task's per-layer probe and its
# hierarchical run at the same budget ($task_epochs), so a probe row is the size-matched single-layer control
for stage_seed in 4:0 5:1; do
  n="${stage_seed%:*}" seed="${stage_seed#*:}"
  for enc in $encoders; do
    if run_stage "$n" "phones, speaker, gender, child/adult and the ASR probe, seed $seed ($enc)" "$enc"; then
      for task in gender age_group speaker phones; do
        # shellcheck disable=SC2046  # task_args's words are options
        probe "$enc/probe_$task-s$seed" $(task_args "$task" "$enc") --seed "$seed"
        train "$enc/${task}_hierarchical-s$seed" $(task_args "$task" "$enc") --fusion hierarchical \
          --epochs "$task_epochs" --seed "$seed"
        # the speaker traits peak below the top layer: does fusing beat one learned weight per layer there?
        [ "$task" = phones ] || train "$enc/${task}_weighted-s$seed" $(task_args "$task" "$enc") \
          --fusion weighted --epochs "$task_epochs" --seed "$seed"
      done
      [ "$seed" = 0 ] && probe "$enc/probe_asr-s0" --cache "$exp/caches/$enc/train.zarr" \
        --valid-cache "$exp/caches/$enc/valid.zarr" --seed 0
      done_stage "$n" "$enc"
    fi
  done
done

evaluate_runs() {  # evaluate_runs ENC: every finished run of ENC not evaluated since it last trained
  local run
  for run in "$exp/$1"/*/; do
    [ -f "$run/metrics.json" ] || continue
    [ "$run/eval/valid/metrics.json" -nt "$run/metrics.json" ] && continue
    case "$run" in
      */speaker_*|*/probe_*) continue ;;  # speaker id validates on the training cache's held-out utterances
      *online_*) hff-cache evaluate "$run" --data "$m/valid.jsonl" --group-by corpus > /dev/null ;;
      *) hff-cache evaluate "$run" --cache "$exp/caches/$1/valid.zarr" --group-by corpus > /dev/null ;;
    esac
  done
}

for enc in $encoders; do
  # no done-marker: each finished run is evaluated once (again when it trained on after its evaluation)
  if run_stage 6 "per-domain evaluation ($enc)"; then evaluate_runs "$enc"; fi
done

online() {  # online ENC RUN TRAIN_MANIFEST [options...]
  local enc="$1" run="$2" data="$3"; shift 3
  # 200 s of padded audio per batch: the cached runs' 10,000 frames at 50 Hz, so every row takes the same steps
  train "$enc/$run" --online --model "faster-whisper:$enc" --data "$data" --valid-data "$m/valid.jsonl" \
    --batch-seconds 200 "$@"
}

for enc in $online_encoders; do
  if run_stage 7 "the paper's table on $enc, training data: $online_data" "$enc"; then
    c="$exp/caches/$enc"
    if [ "$online_data" = 1h ]; then data="$m/train_1h.jsonl" tag=subset_; else data="$m/train.jsonl" tag=; fi
    rows=(--cache "$c/train.zarr" --valid-cache "$c/valid.zarr" --labels "$data" --valid-labels "$m/valid.jsonl")
    for fusion in last hierarchical weighted; do  # the cached rows on exactly the online rows' utterances
      train "$enc/${tag}asr_$fusion-s0" "${rows[@]}" --fusion "$fusion" --seed 0
    done
    train "$enc/${tag}asr_last-wide-s0" "${rows[@]}" --fusion last --width "$(control_width "$enc")" --seed 0
    for method in $online_methods; do
      online "$enc" "${tag}online_$method-s0" "$data" --method "$method" --seed 0
    done
    for seed in $seeds; do  # hff-adapters lies within a point of cached hierarchical (tiny.en): its further seeds
      [ "$seed" = 0 ] || [ "$online_methods" != "$all_methods" ] && continue
      online "$enc" "${tag}online_hff-adapters-s$seed" "$data" --method hff-adapters --seed "$seed"
    done
    if [ "$online_methods" = "$all_methods" ]; then done_stage 7 "$enc"; else wait_runs; fi
  fi
done

for enc in $encoders; do
  if run_stage 8 "Whisper on its 30 s window, the 1-hour subset ($enc)" "$enc"; then
    # paired with stage 7's cached rows: the same utterances, seed and settings, only the window differs
    c30="$exp/caches/$enc-30s"
    for split in train_1h valid; do
      hff-cache extract --model "faster-whisper:$enc" --whisper-window 30s --data "$m/$split.jsonl" \
        --out "$c30/$split.zarr" --threads "$threads" --no-progress
    done
    for fusion in last hierarchical; do
      train "$enc/subset_window30s_asr_$fusion-s0" --cache "$c30/train_1h.zarr" --valid-cache "$c30/valid.zarr" \
        --fusion "$fusion" --labels "$m/train_1h.jsonl" --valid-labels "$m/valid.jsonl" --seed 0
    done
    done_stage 8 "$enc"
  fi
done


num_layers() { case "$1" in tiny.en) echo 4 ;; base) echo 6 ;; *) echo "unknown encoder $1" >&2; exit 2 ;; esac; }

for enc in $online_encoders; do
  if run_stage 9 "partial caching on $enc: hff-adapters from layer K, the 1-hour subset" "$enc"; then
    c="$exp/caches/$enc" top="$(num_layers "$enc")"
    partial=(--online --model "faster-whisper:$enc" --method hff-adapters --cache "$c/train.zarr"
      --valid-cache "$c/valid.zarr" --labels "$m/train_1h.jsonl" --valid-labels "$m/valid.jsonl")
    for k in $((top / 2)) 0; do
      train "$enc/subset_partial_k$k-s0" "${partial[@]}" --from-layer "$k" --seed 0
    done
    for seed in $seeds; do  # further seeds of both rows (K = L/2 is the best so far, K = 0 on hff-adapters')
      [ "$seed" = 0 ] && continue
      for k in $((top / 2)) 0; do
        train "$enc/subset_partial_k$k-s$seed" "${partial[@]}" --from-layer "$k" --seed "$seed"
      done
    done
    done_stage 9 "$enc"
  fi
done

for enc in $encoders; do
  if run_stage 11 "cache v2: hierarchical from 0.25 B/value caches on the 1-hour subset, paired by seed ($enc)" \
      "$enc"; then
    c="$exp/caches/$enc"
    sub=(--labels "$m/train_1h.jsonl" --valid-labels "$m/valid.jsonl" --fusion hierarchical)
    for seed in $seeds; do  # seed 0's fp16 row is stage 7's subset_asr_hierarchical-s0
      train "$enc/subset_asr_hierarchical-s$seed" --cache "$c/train.zarr" --valid-cache "$c/valid.zarr" \
        "${sub[@]}" --seed "$seed"
    done
    # tpcape: entropy-coded levels of what the layer below does not predict (since 2026-12-07 with a
    # deadzone, centroid decoding and groups of 8 frames, since 2026-12-08 decoded exactly: a cache of an
    # older tpcape is refused as "other settings", so move it aside first); tpcape-int8: the same with the
    # int8 prediction, which --in-memory holds as codes (bit-packed levels); tpcap: tpca's fixed-width codes
    # after the int8 prediction (resident as codes); tpca: neither. All at 0.25 B/value or less on disk:
    # tpcape's rate control lands ~0.5% above its target, so it is asked for 1.96 bits (docs/results.md).
    for codec in $codecs; do
      case "$codec" in
        tpcape) params=(--codec tpcape --codec-param bits=1.96 --codec-param pred=float32) ;;
        tpcape-int8) params=(--codec tpcape --codec-param bits=1.96 --codec-param pred=int8) ;;
        *) params=(--codec "$codec") ;;
      esac
      for split in train valid; do
        hff-cache transcode "$c/$split.zarr" "$c/$split-$codec.zarr" "${params[@]}" --no-progress
      done
      for seed in $seeds; do
        train "$enc/subset_${codec}_asr_hierarchical-s$seed" --cache "$c/train-$codec.zarr" \
          --valid-cache "$c/valid-$codec.zarr" "${sub[@]}" --seed "$seed"
      done
    done
    if [ "$codecs" = "$all_codecs" ]; then done_stage 11 "$enc"; else wait_runs; fi
  fi
done

for enc in $encoders; do
  if run_stage 12 "gender's further seeds ($enc)" "$enc"; then
    csvs=("$exp/$enc"/probe_gender-s*/probe.csv)
    if [ ! -f "${csvs[0]}" ]; then log "  no gender probe for $enc yet (stage 4): skipped"; continue; fi
    # the layer with the best accuracy in any gender probe so far (stage 4's probes every layer)
    layer="$(awk -F, 'FNR > 1 && (best == "" || $2 > best) { best = $2; layer = $1 } END { print layer }' "${csvs[@]}")"
    for seed in $trait_seeds; do
      # shellcheck disable=SC2046  # task_args's words are options
      probe "$enc/probe_gender-s$seed" $(task_args gender "$enc") --layers "$layer" --seed "$seed"
      train "$enc/gender_hierarchical-s$seed" $(task_args gender "$enc") --fusion hierarchical \
        --epochs "$task_epochs" --seed "$seed"
    done
    done_stage 12 "$enc"
  fi
done

for enc in $encoders; do
  if run_stage 13 "speaker traits, the fusion started uniform ($enc)" "$enc"; then
    for seed in $seeds; do
      for task in speaker age_group gender; do
        # shellcheck disable=SC2046  # task_args's words are options
        train "$enc/${task}_hierarchical-uniform-s$seed" $(task_args "$task" "$enc") --fusion hierarchical \
          --top-init 0 --rung-gate-init none --epochs "$task_epochs" --seed "$seed"
      done
    done
    done_stage 13 "$enc"
  fi
done

for enc in $encoders; do
  [ "$enc" = base ] || continue  # the LibriSpeech goal is base's
  if run_stage 14 "towards LibriSpeech below 35% ($enc): regularisation, subwords, context, in-domain data" "$enc"; then
    asr=(--cache "$exp/caches/$enc/train.zarr" --valid-cache "$exp/caches/$enc/valid.zarr" --fusion last --seed 0)
    train "$enc/asr_last-spec-s0" "${asr[@]}" --spec-time-masks 4 --spec-feat-masks 2 --spec-feat-width 64
    train "$enc/asr_last-specdrop-s0" "${asr[@]}" --spec-time-masks 4 --spec-feat-masks 2 --spec-feat-width 64 \
      --dropout 0.3
    train "$enc/asr_last-bpe256-s0" "${asr[@]}" --units bpe:256
    train "$enc/asr_last-deep-s0" "${asr[@]}" --blocks 6 --kernel 15
    train "$enc/asr_last-lstm-s0" "${asr[@]}" --downstream lstm
    # the learning curve: LibriSpeech's 248 training utterances (50 min) and evenly spaced 1/2 and 1/4 of
    # them, alone; epochs x utterances held at 80 x 248, the ~1,400 steps of the 20 epochs on all 204 min
    for n_seed in 62:0 124:0 248:0 248:1; do  # a second seed where it meets the all-data row
      n="${n_seed%:*}" seed="${n_seed#*:}"
      hff-cache manifest "$m/libri_train.jsonl" --max-utts "$n" --out "$exp/labels/libri_$n.jsonl" > /dev/null
      train "$enc/asr_last-libri$n-s$seed" "${asr[@]}" --labels "$exp/labels/libri_$n.jsonl" \
        --valid-labels "$m/valid.jsonl" --epochs $((80 * 248 / n)) --eval-every $((8 * 248 / n)) --seed "$seed"
    done
    wait_runs
    evaluate_runs "$enc"
    done_stage 14 "$enc"
  fi
done

if run_stage 10 "summary tables and figures"; then
  mkdir -p "$exp/report"
  for enc in $encoders; do
    [ -d "$exp/$enc" ] || continue
    layers=()  # which layer serves which task, once a probe has finished
    compgen -G "$exp/$enc/probe_*/probe.csv" > /dev/null && layers=(--plot-layers "$exp/report/layers_$enc.png")
    hff-cache summary --markdown --eval valid --plot "$exp/report/wer_time_$enc.png" "${layers[@]}" \
      "$exp/$enc"/*/ | tee "$exp/report/summary_$enc.md"
  done
fi
wait_runs
