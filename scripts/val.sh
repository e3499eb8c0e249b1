#!/usr/bin/env bash
# Evaluate trained models, five folds (validation.py, one run per fold and label group; the shared
# protocol unless a protocol named config is given), then print the table of the runs it evaluated (python -m scripts.collect_results;
# also written to $LOG_DIR/tables/<DATASET>_setting<s>_<method>/). Each fold evaluates the last
# snapshot of the newest finished training run of its configuration (as trained by the
# scripts/train_*.sh script with the same arguments), unless evaluation.checkpoint is given.
#   scripts/val.sh [abd_mr|abd_ct|cmr] [method] [setting] [extra Sacred updates]
#   scripts/val.sh abd_mr qnet 1 protocol_qnet     # the same models under Q-Net's protocol
#   DATA_DIR=/data/CHAOST2 FOLDS="0 1" scripts/val.sh abd_mr adnet 1  # data elsewhere, two folds
# Environment: DATA_DIR (default ./data/<NAME>), FOLDS (default "0 1 2 3 4"), GROUPS_S2, GPUS,
# LOG_DIR (default ./runs; a log_dir=... update also sets it), PYTHON; see scripts/common.sh.
# The exit status is 1 if an evaluation or the table failed.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-${TARGET:-abd_mr}}          # abd_mr | abd_ct | cmr
METHOD=${2:-${METHOD:-adnet}}           # adnet | qnet | alpnet | dspnet | rpt | gmrd
SETTING=${3:-${SETTING:-1}}             # 1 | 2
shift $(( $# > 3 ? 3 : $# )) || true
case "$TARGET" in
  abd_mr) DATASET=chaost2; NAME=CHAOST2; DEFAULT_GROUPS="2,3 1,4" ;;
  abd_ct) DATASET=sabs;    NAME=SABS;    DEFAULT_GROUPS="2,3 1,6" ;;
  cmr)    DATASET=cmr;     NAME=CMR;     DEFAULT_GROUPS="1,2,3" ;;
  *) echo "unknown target '$TARGET': use abd_mr, abd_ct or cmr" >&2; exit 2 ;;
esac
DATA_DIR=${DATA_DIR:-./data/$NAME}
FOLDS=${FOLDS:-"0 1 2 3 4"}
GROUPS_S2=${GROUPS_S2:-$DEFAULT_GROUPS}
LOG_DIR=${LOG_DIR:-./runs}
for arg in "$@"; do                     # a log_dir= update wins over LOG_DIR, as it does in Sacred
  case "$arg" in log_dir=*) LOG_DIR=${arg#log_dir=} ;; esac
done
GPUS=${GPUS:-}
source scripts/common.sh

# the evaluation run folders (<log_dir>/test/<exp_name>/<id>) before and after: the new ones are this
# script's runs, and only they go into the table
list_runs() { { find "$LOG_DIR/test" -mindepth 2 -maxdepth 2 -type d 2>/dev/null || true; } | LC_ALL=C sort; }
before=$(list_runs)
status=0
run_folds validation.py "$@" || status=1
mapfile -t evaluated < <(LC_ALL=C comm -13 <(printf '%s\n' "$before") <(list_runs))
if [ ${#evaluated[@]} -eq 0 ]; then
  echo "no evaluation run was written: no table" >&2
  exit 1
fi
TABLE_DIR=$LOG_DIR/tables/${NAME}_setting${SETTING}_${METHOD}
echo ">>> -m scripts.collect_results <the ${#evaluated[@]} evaluation runs above> --out $TABLE_DIR"
"$PYTHON" -m scripts.collect_results "${evaluated[@]}" --out "$TABLE_DIR" || status=1
exit $status
