# Device check (H200, the workplace's device tool): the CUDA tests, then an MRPC teacher, compress
# at S = 0.5 and 0.875 (torchrun, NCCL, 1 epoch re-finetune) and pgb bench on the GPU.
# Prepare with benchmarks/device/prepare_carry.py; run as `bash .devcarry/gpu.sh` with .devcarry
# carried. Results: benchmarks/results/gpu_h200_2026-12-04.json.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.devcarry/shim TOKENIZERS_PARALLELISM=false
mkdir -p ../shared && ln -sfn $PWD/.devcarry/data ../shared/data
python3 -c "import torch,transformers,sys;print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee $OUT/env.txt
python3 -m pip show -q onnxruntime hypothesis pytest-xdist datasets 2>&1 | grep -E "^(Name|Version)" | paste - - >> $OUT/env.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> $OUT/env.txt
python3 - <<'PY'
from safetensors.torch import load_file, save_file
import shutil, os
shutil.copytree('.devcarry/minilm', '/tmp/minilm')
sd = load_file('/tmp/minilm/model.safetensors')
save_file({k: v.float() for k, v in sd.items()}, '/tmp/minilm/model.safetensors', metadata={'format': 'pt'})
PY
T0=$(date +%s)
timeout -s INT 100 python3 -m pytest -q -p no:cacheprovider -p no:xdist -p no:benchmark --tb=short -rfE tests/test_cuda.py tests/test_grouped_linear.py::test_cuda_matches_cpu tests/test_reliability.py::test_train_resumes_on_cuda_with_the_same_dropout > $OUT/pytest.log 2>&1; echo "pytest rc=$? $(( $(date +%s)-T0 )) s" | tee -a $OUT/flow.log
tail -15 $OUT/pytest.log
run() { local t=$1; shift; local s=$(date +%s); echo "+ $*" >> $OUT/flow.log; timeout $t "$@" >> $OUT/flow.log 2>&1; echo "rc=$? $(( $(date +%s)-s )) s" >> $OUT/flow.log; }
TR="torchrun --standalone --nproc_per_node 1 -m pgb -q"
export OMP_NUM_THREADS=8
run 120 $TR finetune --model /tmp/minilm --task mrpc --data-dir ../shared/data --out /tmp/t/mrpc --epochs 5 --lr 1e-4 --batch-size 32
for s in 0.5 0.875; do
  run 110 $TR compress --model /tmp/t/mrpc --task mrpc --data-dir ../shared/data --sparsity $s --out /tmp/c/$s --refinetune-epochs 1
  cp /tmp/c/$s/report.json $OUT/report_$s.json
done
for s in 0.5 0.875; do for b in "32 128" "1 128"; do set -- $b
  run 40 python3 -m pgb -q bench --model /tmp/c/$s --baseline /tmp/t/mrpc --device cuda --repeats 30 --batch-size $1 --seq-len $2
done; done
tail -40 $OUT/flow.log
