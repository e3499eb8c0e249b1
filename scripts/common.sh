# Shared by the train_*/val_* scripts: loop over folds (and, in setting 2, over the label groups),
# one run after the other, or spread over GPUs when GPUS lists several ("0 1 2 3").
#
# Variables (set by the calling script, overridable from the environment):
#   METHOD DATASET DATA_DIR SETTING FOLDS GROUPS_S2 GPUS LOG_DIR PYTHON

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

run_folds() {
  local script=$1; shift
  local groups=("")
  if [ "$SETTING" = "2" ]; then read -r -a groups <<< "$GROUPS_S2"; fi
  local gpus=()
  read -r -a gpus <<< "${GPUS:-}"
  local n=0 failed=0 pids=()
  for group in "${groups[@]}"; do
    for fold in $FOLDS; do
      local args=(with "$METHOD" "$DATASET" "data_dir=$DATA_DIR" "setting=$SETTING" "eval_fold=$fold"
                  "log_dir=$LOG_DIR")
      [ -n "$group" ] && args+=("test_labels=[$group]")
      echo ">>> $script ${args[*]} $*"
      if [ ${#gpus[@]} -gt 1 ]; then
        CUDA_VISIBLE_DEVICES=${gpus[$((n % ${#gpus[@]}))]} "$PYTHON" "$script" "${args[@]}" "$@" &
        pids+=($!)
        n=$((n + 1))
        if [ $((n % ${#gpus[@]})) -eq 0 ]; then
          for p in "${pids[@]}"; do wait "$p" || failed=1; done; pids=()
        fi
      else
        "$PYTHON" "$script" "${args[@]}" "$@" || failed=1
      fi
    done
  done
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  return $failed
}
