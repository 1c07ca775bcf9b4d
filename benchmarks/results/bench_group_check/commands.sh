set -u
cd "${CHECKOUT:?a checkout of d2f13e9 holding runs/grid_time_task_bench and runs/teachers/cola}"
export HF_HUB_OFFLINE=1 PYTHONPATH=$CHECKOUT
# (in the venv where pgb is installed)
R=runs/grid_time_task_bench
T=runs/teachers/cola
one() { pgb -q bench --model $R/minilm-cola-pgb-s0.5-rft --baseline $T --structured $R/minilm-cola-structured-s0.5-rft --batch-size 32 --seq-len 128 --threads 2 "$@" | tail -1; }
all=""; for d in $R/minilm-cola-*-rft; do all="$all --model $d"; done
echo A1 $(date +%T); one
echo B $(date +%T); pgb -q bench $all --baseline $T --batch-size 32 --seq-len 128 --threads 2 | tail -1
echo A2 $(date +%T); one
echo end $(date +%T)
