# Stage helpers the recipes share (sourced, not run). They read the recipe's $stage, $stop_stage, $exp,
# $epochs, $threads and ${extra[@]}.

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

train() {  # train RUN [options...]: one run directory under $exp, resumed when interrupted, skipped when finished
  local run="$exp/$1"; shift
  if [ -f "$run/metrics.json" ]; then log "  $run: finished already"; return; fi
  local resume=()
  [ -f "$run/config.json" ] && resume=(--resume)
  log "  train $run"
  hff-cache train --out "$run" --epochs "$epochs" --threads "$threads" "${resume[@]}" "$@" "${extra[@]}"
}
