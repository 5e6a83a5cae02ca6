# Stage helpers the recipes share (sourced, not run). They read the recipe's $stage, $stop_stage, $exp,
# $epochs, $threads, ${extra[@]} and, where a recipe has --jobs, $jobs.

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
done_stage() { wait_runs; date '+%F %T' > "$exp/.done/stage-$1${2:+-$2}"; }

train() {  # train RUN [options...]: one run directory under $exp, resumed when interrupted, skipped when finished
  local run="$exp/$1" name="${1//\//_}"; shift
  if [ -f "$run/metrics.json" ]; then log "  $run: finished already"; return; fi
  local resume=()
  [ -f "$run/config.json" ] && resume=(--resume)
  local cmd=(hff-cache train --out "$run" --epochs "$epochs" --threads "$threads" "${resume[@]}" "$@" "${extra[@]}")
  if [ "${jobs:-1}" -le 1 ]; then log "  train $run"; "${cmd[@]}"; return; fi
  # --jobs N: up to N runs at once in the background (a GPU host has room for many small runs); the stage's
  # done_stage (or the recipe's closing wait_runs) waits for them
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
  mkdir -p "$exp/logs"
  log "  train $run (in the background, log $exp/logs/$name.log)"
  "${cmd[@]}" > "$exp/logs/$name.log" 2>&1 &
  train_pids+=("$!:$run")
}

train_pids=()
wait_runs() {  # wait for the background runs; stop the recipe, naming them, if any failed
  local failed=() entry
  for entry in "${train_pids[@]}"; do wait "${entry%%:*}" || failed+=("${entry#*:}"); done
  train_pids=()
  [ ${#failed[@]} -eq 0 ] && return
  log "failed: ${failed[*]} (their logs: $exp/logs/)"
  exit 1
}
