#!/usr/bin/env bash
# Train a method on CMR, five folds (training.py, one run per fold; scripts/val.sh cmr evaluates
# them). In setting 2 one model per label group is trained, with that group's test organs removed
# from training: the three structures (1,2,3).
#   scripts/train_cmr.sh [method] [setting] [extra Sacred updates, e.g. train.n_steps=1000]
#   scripts/train_cmr.sh qnet 2                                   # setting 2, folds 0-4, every group
#   DATA_DIR=/data/CMR FOLDS="0 1" scripts/train_cmr.sh adnet 1  # data elsewhere, two folds
#   GPUS="0 1 2 3" scripts/train_cmr.sh qnet 1                    # folds spread over four GPUs
# Environment: DATA_DIR (default ./data/CMR), FOLDS (default "0 1 2 3 4"), GROUPS_S2 (default
# "1,2,3"), GPUS, LOG_DIR (default ./runs), PYTHON; see scripts/common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-${METHOD:-adnet}}         # adnet | qnet | alpnet | dspnet | rpt | gmrd
SETTING=${2:-${SETTING:-1}}           # 1 | 2
shift $(( $# > 2 ? 2 : $# )) || true
DATASET=cmr
DATA_DIR=${DATA_DIR:-./data/CMR}
FOLDS=${FOLDS:-"0 1 2 3 4"}
GROUPS_S2=${GROUPS_S2:-"1,2,3"}   # setting 2: test label groups, one model each
LOG_DIR=${LOG_DIR:-./runs}
GPUS=${GPUS:-}
source scripts/common.sh
run_folds training.py "$@"
