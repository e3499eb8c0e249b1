#!/usr/bin/env bash
# The demo: synthetic phantoms -> evaluate ADNet untrained -> train it (self-supervised, on
# supervoxels) -> evaluate it. Needs no downloaded data or weights. Runs land in runs/demo/.
#   scripts/demo.sh [extra Sacred updates, e.g. train.n_steps=200]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
LOG_DIR=${LOG_DIR:-runs/demo}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1

echo "== 1/4 synthetic phantoms (data/SYNTH)"
"$PYTHON" -m data.phantoms data/SYNTH

echo "== 2/4 evaluate the untrained model"
"$PYTHON" validation.py -l WARNING with demo log_dir="$LOG_DIR" evaluation.checkpoint=untrained "$@" \
  | tee "$LOG_DIR/untrained.txt"

echo "== 3/4 train ADNet on the phantoms' supervoxels"
"$PYTHON" training.py -l WARNING with demo log_dir="$LOG_DIR" "$@"

echo "== 4/4 evaluate the trained model (last snapshot of that training run)"
"$PYTHON" validation.py -l WARNING with demo log_dir="$LOG_DIR" "$@" | tee "$LOG_DIR/trained.txt"

echo
echo "== untrained:"; grep -E "^(class|mean|LIVER|RK|LK|SPLEEN) " "$LOG_DIR/untrained.txt"
echo "== trained:";   grep -E "^(class|mean|LIVER|RK|LK|SPLEEN) " "$LOG_DIR/trained.txt"
echo "overlays, predictions and results.csv: $(ls -d "$LOG_DIR"/test/*/* | tail -1)"
