# Shared by scripts/train_abd_mr.sh, train_abd_ct.sh, train_cmr.sh and val.sh (sourced, not run):
# loop over the folds (and, in setting 2, over the label groups), one run after the other, or spread
# over GPUs when GPUS lists several ("0 1 2 3").
#
# Variables (set by the calling script, most of them from the environment or a default):
#   METHOD SETTING           the method and setting (the script's positional arguments)
#   DATASET                  the dataset's named config (fixed by the script: chaost2, sabs, cmr)
#   DATA_DIR                 the dataset folder (default ./data/<NAME>)
#   FOLDS                    the folds to run (default "0 1 2 3 4")
#   GROUPS_S2                setting 2: the test label groups, one model each (e.g. "2,3 1,4")
#   GPUS                     GPU ids ("0 1 2 3"): each run sees one of them (CUDA_VISIBLE_DEVICES), and
#                            with several, one run per GPU at a time (default empty: every run sees
#                            every GPU, one run at a time)
#   LOG_DIR                  the runs' log_dir (default ./runs)
#   PYTHON                   the interpreter (default .venv/bin/python if it exists, else python)
# Extra arguments of the calling script are passed to every run as Sacred updates (key=value or a
# named config), after the ones set here, so that they win.

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
      elif [ ${#gpus[@]} -eq 1 ]; then
        CUDA_VISIBLE_DEVICES=${gpus[0]} "$PYTHON" "$script" "${args[@]}" "$@" || failed=1
      else
        "$PYTHON" "$script" "${args[@]}" "$@" || failed=1
      fi
    done
  done
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  return $failed
}
