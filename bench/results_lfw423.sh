#!/usr/bin/env bash
# docs/RESULTS.md: the three methods on the 423 LFW identities with >= 5 images,
# same backbone, same total epochs, same seed; then one evaluation table.
#   bash bench/results_lfw423.sh [SEED] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-42}
OUT=${2:-runs/results}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for METHOD in clustered random single; do
  RUN=$OUT/lfw423-$METHOD-s$SEED
  if [ -f "$RUN/results.json" ]; then
    continue
  elif [ -f "$RUN/config.yaml" ]; then  # interrupted earlier: continue it
    ARGS=(resume=$RUN)
  else
    ARGS=(-c configs/experiment/lfw423.yaml -c configs/method/$METHOD.yaml seed=$SEED
          output_dir=$OUT run_name=lfw423-$METHOD-s$SEED eval.after_training=false)
  fi
  $PY train.py "${ARGS[@]}" >> "$RUN.log" 2>&1 || { echo "training $METHOD failed, see $RUN.log"; exit 1; }
done
$PY evaluate.py run=$OUT/lfw423-clustered-s$SEED run=$OUT/lfw423-random-s$SEED run=$OUT/lfw423-single-s$SEED
