#!/usr/bin/env bash
# Figures for a machine with one NVIDIA GPU, in at most 8 minutes, into one JSON file.
#
#   bash bench/gpu.sh                 # on the GPU machine (after `make install`)
#   bash bench/gpu.sh --dry-run       # the steps at toy size on the CPU (CI runs this):
#                                     # 32-true and bf16-mixed, no model.compile step
#
# Steps (each writes a JSON file; the last step merges them into --out):
#   1. framework overhead (bench/train_overhead.py): IResNet-50, 112x112, batch 256,
#      bf16-mixed and 16-mixed, and bf16-mixed with model.compile (one round);
#   2. both stages of a short LFW run (bench/stage_speed.py): images/s per stage and
#      peak memory, then routed / ISM / single inference images/s from its evaluation;
#   3. input pipeline images/s from the folder and from .rec (bench/data_throughput.py),
#      and data.decode=device's batched nvJPEG decode on the GPU.
# Options: --out FILE (default bench/results/gpu.json), --lfw DIR (default
# ../shared/datasets/lfw-112/images when it is there, else the bundled
# datasets/lfw-demo/images; --dry-run: the bundled set). Each step's JSON is kept in FILE's folder as
# gpu-parts/ even when a later step fails, and merged into FILE at the end. --dry-run
# writes into a new temporary folder unless given --out: it never replaces the GPU figures.
# Relative paths given are the caller's; the defaults are the project's.
set -euo pipefail
usage="use --dry-run, --out FILE, --lfw DIR"
DRY=0
OUT=
LFW=
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | cut -c3-; exit 0 ;;
    --dry-run) DRY=1 ;;
    --out|--lfw)
      if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
        echo "bench/gpu.sh: $1 needs a value ($usage)" >&2; exit 2
      fi
      case "$2" in /*) value=$2 ;; *) value=$PWD/$2 ;; esac
      if [ "$1" = --out ]; then OUT=$value; else LFW=$value; fi
      shift ;;
    *) echo "bench/gpu.sh: unknown argument $1 ($usage)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
if [ -z "$LFW" ]; then
  LFW=../shared/datasets/lfw-112/images
  { [ "$DRY" = 1 ] || [ ! -d "$LFW" ]; } && LFW=datasets/lfw-demo/images
fi
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
[ -d "$LFW" ] || { echo "bench/gpu.sh: no image folder at $LFW (--lfw DIR)" >&2; exit 1; }
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu.sh: no CUDA device visible to $PY; run with --dry-run to check the script" >&2
  exit 1
fi
# after the checks: a refused start leaves the parts of the last run as they were, and
# makes no folder
if [ -z "$OUT" ]; then
  OUT=bench/results/gpu.json
  [ "$DRY" = 1 ] && OUT=$(mktemp -d)/gpu.json  # a folder of its own: runs side by side
fi
PARTS=$(dirname "$OUT")/gpu-parts
rm -rf "$PARTS"
mkdir -p "$PARTS"
RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT

if [ "$DRY" = 1 ]; then
  ACC=cpu
  PRECISIONS="32-true bf16-mixed"
  OVERHEAD=(--backbone tiny --image-size 16 --batch-size 4 --classes 8 --steps 1 --warmup 1 --rounds 1)
  RUN=(-c configs/smoke.yaml data.max_classes=8 trainer.accelerator=cpu eval.plots=false)
  DATA=(--batches 2 --batch-size 8 --rounds 1 --workers 0 --seconds 0.2)
else
  ACC=gpu
  PRECISIONS="bf16-mixed 16-mixed"
  OVERHEAD=(--backbone iresnet50 --width 64 --image-size 112 --batch-size 256 --classes 10000 --steps 20 --warmup 5 --rounds 3)
  RUN=(-c configs/smoke.yaml model.backbone=iresnet50 model.kwargs.width=64 data.image_size=112
       data.batch_size=256 data.num_workers=8 data.min_images_per_class=4 data.max_classes=null
       trainer.max_epochs=null stage1.max_epochs=2 stage2.max_epochs=1 trainer.accelerator=gpu
       eval.plots=false)
  DATA=(--batches 40 --batch-size 256 --rounds 3 --workers 0 1 2 4 8)
fi
export WANDB_MODE=disabled

for precision in $PRECISIONS; do
  echo "== overhead: $precision"
  "$PY" bench/train_overhead.py --accelerator "$ACC" --precision "$precision" \
    "${OVERHEAD[@]}" --out "$PARTS/overhead-$precision-compile-false.json"
done
if [ "$DRY" = 0 ]; then  # every fit compiles afresh: one round, bf16 only
  echo "== overhead: bf16-mixed, model.compile=true"
  "$PY" bench/train_overhead.py --accelerator "$ACC" --precision bf16-mixed --compile true \
    "${OVERHEAD[@]}" --rounds 1 --out "$PARTS/overhead-bf16-mixed-compile-true.json"
fi

echo "== stages and inference on LFW"
"$PY" bench/stage_speed.py "${RUN[@]}" data.root="$LFW" output_dir="$RUNS" logger=none \
  --out "$PARTS/stages.json"

echo "== input pipeline"
"$PY" bench/data_throughput.py --root "$LFW" "${DATA[@]}" --out "$PARTS/data.json"

mkdir -p "$(dirname "$OUT")"
"$PY" - "$PARTS" "$OUT" "$DRY" <<'PYEOF'
import json, sys
from importlib.metadata import version
from pathlib import Path

parts, out, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
if not dry:  # a dry run measured on the CPU: no device to name, and torch not imported
    import torch
merged = {
    "dry_run": dry,
    "torch": version("torch") if dry else torch.__version__,
    "gpu": None if dry or not torch.cuda.is_available() else torch.cuda.get_device_name(),
}  # each part's own JSON names its machine and code (facecluster.results.measured)
for part in sorted(parts.glob("*.json")):
    merged[part.stem] = json.loads(part.read_text())
out.write_text(json.dumps(merged, indent=2))
print(f"bench/gpu.sh: wrote {out}")
PYEOF
