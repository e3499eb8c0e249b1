#!/usr/bin/env bash
# Evaluate trained models, five folds, with the shared protocol; then collect the fold results
# into one table. Each fold's evaluation uses the last snapshot of its newest training run (the
# same method, dataset, setting, test labels and fold) unless evaluation.checkpoint is given.
#   scripts/val.sh [abd_mr|abd_ct|cmr] [method] [setting] [extra Sacred updates]
#   scripts/val.sh abd_mr qnet 1 protocol_qnet        # Q-Net's own protocol variant
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-${TARGET:-abd_mr}}          # abd_mr | abd_ct | cmr
METHOD=${2:-${METHOD:-adnet}}           # adnet | qnet | alpnet | dspnet
SETTING=${3:-${SETTING:-1}}             # 1 | 2
shift $(( $# > 3 ? 3 : $# )) || true
case "$TARGET" in
  abd_mr) DATASET=chaost2; DEFAULT_DIR=./data/CHAOST2; DEFAULT_GROUPS="2,3 1,4" ;;
  abd_ct) DATASET=sabs;    DEFAULT_DIR=./data/SABS;    DEFAULT_GROUPS="2,3 1,6" ;;
  cmr)    DATASET=cmr;     DEFAULT_DIR=./data/CMR;     DEFAULT_GROUPS="1,2,3" ;;
  *) echo "unknown target '$TARGET': use abd_mr, abd_ct or cmr" >&2; exit 2 ;;
esac
DATA_DIR=${DATA_DIR:-$DEFAULT_DIR}
FOLDS=${FOLDS:-"0 1 2 3 4"}
GROUPS_S2=${GROUPS_S2:-$DEFAULT_GROUPS}
LOG_DIR=${LOG_DIR:-./runs}
GPUS=${GPUS:-}
source scripts/common.sh
run_folds validation.py "$@"
