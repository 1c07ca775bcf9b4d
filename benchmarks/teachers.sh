#!/usr/bin/env bash
# Fine-tune the MiniLM-L6 task teachers used by every benchmark, then copy their
# metrics.json into benchmarks/results/teachers/. Usage: bash benchmarks/teachers.sh [TASK...]
# Teachers land in runs/teachers/<task> (ignored by git); an existing teacher is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DATA=${PGB_DATA_DIR:-../shared/data}
mkdir -p runs/teachers benchmarks/results/teachers
teacher() {  # task, then extra finetune flags
  local task=$1; shift
  if [[ ! -f runs/teachers/$task/metrics.json ]]; then
    # the task is the name up to its first "-" (mrpc-mpnet: an MRPC teacher)
    pgb -q finetune --task "${task%%-*}" --data-dir "$DATA" --out "runs/teachers/$task" "$@"
  fi
  cp "runs/teachers/$task/metrics.json" "benchmarks/results/teachers/$task.json"
}
# The SST-2, CoLA and SQuAD teachers (results/teachers/sst2.json, cola.json, squad.json) were
# fine-tuned on the 2-core CPU with this script (sst2: 48 min; squad: 94 min of training on
# the 6,000-question subset); the earlier ones (sst2_gpu_h200.json, cola_gpu_h200.json,
# squad_gpu_h200.json), were trained on one H200 GPU with the same
# flags, launched as `torchrun --standalone --nproc_per_node 1 -m pgb -q finetune ...`
# (squad: --epochs 2 --batch-size 32, the whole training set), and their dev metrics
# re-measured here on the CPU with `pgb evaluate` (see "metrics" vs "metrics_gpu" in
# results/teachers/<task>.json). On this 2-core CPU use the subset flags below instead.
tasks=${*:-"mrpc stsb sst2 cola squad"}  # mrpc-mpnet on request
for t in $tasks; do
  case $t in
    mrpc) teacher mrpc --epochs 5 --lr 1e-4 --batch-size 32 ;;
    stsb) teacher stsb --epochs 4 --lr 1e-4 --batch-size 32 ;;
    sst2) teacher sst2 --epochs 1 --lr 1e-4 --batch-size 32 ;;
    cola) teacher cola --epochs 4 --lr 1e-4 --batch-size 32 ;;
    squad) teacher squad --epochs 2 --lr 1e-4 --batch-size 16 --max-train-samples 6000 ;;
    # base size: all-mpnet-base-v2 (12 layers, hidden 768), 46 min on the 2-core AMD EPYC
    mrpc-mpnet) teacher mrpc-mpnet --model "$(bash ../shared/scripts/get-mpnet-base.sh)" \
                  --epochs 2 --lr 3e-5 --batch-size 32 ;;
    *) echo "unknown task $t" >&2; exit 2 ;;
  esac
done
