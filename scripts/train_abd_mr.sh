#!/usr/bin/env bash
# Train a method on CHAOST2, five folds. In setting 2 one model per label group is trained and
# evaluated (the test organs of the group removed from training).
#   scripts/train_abd_mr.sh [method] [setting] [extra Sacred updates, e.g. train.n_steps=1000]
#   GPUS="0 1 2 3" scripts/train_abd_mr.sh qnet 1      # folds spread over four GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-${METHOD:-adnet}}         # adnet | qnet | alpnet | dspnet
SETTING=${2:-${SETTING:-1}}           # 1 | 2
shift $(( $# > 2 ? 2 : $# )) || true
DATASET=chaost2
DATA_DIR=${DATA_DIR:-./data/CHAOST2}
FOLDS=${FOLDS:-"0 1 2 3 4"}
GROUPS_S2=${GROUPS_S2:-"2,3 1,4"}   # setting 2: test label groups, one model each
LOG_DIR=${LOG_DIR:-./runs}
GPUS=${GPUS:-}
source scripts/common.sh
run_folds training.py "$@"
