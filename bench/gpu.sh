#!/usr/bin/env bash
# HyMiRec on a lent GPU (the workplace's `device` machine), in one prepared call.
#
#   bench/gpu.sh smoke [SECONDS]           GPU tests + the model unit tests, then a 6-epoch ml-100k eval (timing)
#   bench/gpu.sh full  [SECONDS] [SEEDS]   evals of every carried dataset, PARALLEL (default 6) at a time on
#                                          the one GPU, none started that could not finish by SECONDS: per seed
#                                          (default 0,1,2) HyMiRec, HyMiRec-K1 and SASRec-200; on ml-100k, with
#                                          a carried user LLM, also HyMiRec with the tiny one (seed 0)
#   bench/gpu.sh plan  [SECONDS] PLAN      the same, for the runs PLAN names, started in its order: words
#                                          DATASET:MODEL:SEEDS, e.g. "ml-100k:hymirec-k1:0-4 ml-100k:sasrec-200:0-4"
#                                          (SEEDS a comma list or a range A-B; SASRec runs use no user LLM)
#
# That machine has torch and transformers but nothing of ours and no network, and one call carries at
# most 64 MiB: `python -m bench.gpu_prepare` builds what the call carries under .dev/ (git-ignored):
# wheels, the datasets as Parquet, their SmolLM2 item content, and SmolLM2 cut to its first 18 blocks
# as the user LLM (.dev/llm/*.gguf; without it the user LLM is the tiny one). Carry .dev/whl,
# .dev/data, .dev/cache and .dev/llm. Results land in $OUT (JSON lines per run, logs); a table is
# printed last. Session 8, on an H100 with 8 runs at once (`--datasets ml-100k,synthetic --layers 0`):
# a whole ml-100k HyMiRec run 390-480 s (K = 1: 150-280 s), synthetic 180-260 s, SASRec-200 13-50 s.
# Session 11, on an H200, PARALLEL=9, plan "ml-100k:hymirec-k1:0-4 synthetic:hymirec:0-2
# ml-100k:sasrec-200:0-4 synthetic:sasrec-200:0-2": all 16 runs in 284 s (K = 1 175-247 s, synthetic
# HyMiRec 204-232 s, SASRec-200 10-69 s). More processes than that on one GPU slow every run
# (session 9: 14 at once, 415-550 s each), and tiny kernels from many processes queue for the GPU:
# vectorise anything run beside the evals.
set -u
mode=${1:-smoke}
limit=${2:-420}
seeds=${3:-0,1,2}
OUT=${OUT:-/tmp/hymirec-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYMIREC_CACHE_DIR=$PWD/.dev/cache TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

data() { echo --interactions .dev/data/$1-interactions.parquet --items .dev/data/$1-items.parquet; }

user_llm=tiny
if ls .dev/llm/*.gguf >/dev/null 2>&1; then
    user_llm=$(ls .dev/llm/*.gguf | head -1)
fi
echo "user LLM: $user_llm"

if [ "$mode" = smoke ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py tests/test_codebook.py \
        tests/test_losses.py tests/test_metrics.py tests/test_retrieval.py 2>&1 | tee "$OUT/pytest.log" | tail -15
    start=$(date +%s.%N)
    timeout "$limit" python3 -m hymirec.cli eval $(data ml-100k) --model hymirec --item-encoder smollm2 --epochs 6 \
        --seed 0 --json > "$OUT/smoke-eval.jsonl" 2> "$OUT/smoke-eval.log"
    echo "smoke eval rc $? in $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
    cat "$OUT/smoke-eval.jsonl"
    tail -3 "$OUT/smoke-eval.log"
    exit 0
fi

# full: every run a process of its own on the one GPU; "llm" runs use the user LLM above.
export OMP_NUM_THREADS=2
parallel=${PARALLEL:-6}
started=$(date +%s)
while sleep 30; do date +%T; free -m | sed -n 2p; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done \
    > "$OUT/monitor.log" 2>&1 &
monitor=$!
run() {  # name dataset model backbone seed least-seconds-it-needs
    [ -f .dev/data/$2-interactions.parquet ] || return 0
    while [ "$(jobs -rp | wc -l)" -gt "$parallel" ]; do sleep 1; done  # the runs and the monitor
    left=$(( limit - ($(date +%s) - started) ))
    if [ "$left" -lt "$6" ]; then echo "not started, ${left} s left: $1"; return 0; fi
    timeout "$left" python3 -m hymirec.cli eval $(data $2) --model $3 --backbone $4 --item-encoder smollm2 \
        --seed $5 --json > "$OUT/$1.jsonl" 2> "$OUT/$1.log" &
}
if [ "$mode" = plan ]; then
    plan=${3:?plan needs its runs, e.g. ml-100k:hymirec-k1:0-4}
else
    plan=""
    for seed in ${seeds//,/ }; do
        for d in ml-100k synthetic; do plan="$plan $d:hymirec:$seed $d:hymirec-k1:$seed $d:sasrec-200:$seed"; done
    done
fi
for word in $plan; do
    IFS=: read -r d model seedlist <<< "$word"
    case $seedlist in *-*) seedlist=$(seq -s, "${seedlist%-*}" "${seedlist#*-}") ;; esac
    for seed in ${seedlist//,/ }; do
        case $model in
            sasrec*|pop) run ${d//-/}-${model//-/}-s$seed $d $model tiny $seed 40 ;;
            *) run ${d//-/}-${model//-/}-s$seed $d $model "$user_llm" $seed 120 ;;
        esac
    done
done
[ "$mode" = full ] && [ "$user_llm" != tiny ] && run ml100k-tinyllm-s0 ml-100k hymirec tiny 0 120
wait $(jobs -p | grep -v "^$monitor$")
kill $monitor
tail -4 "$OUT/monitor.log"
python3 - "$OUT" "$user_llm" <<'EOF'
import json, sys
from pathlib import Path
out, user_llm = Path(sys.argv[1]), sys.argv[2]
print(f"user LLM of the hymirec and k1 runs: {user_llm}")
cols = ["recall@10", "ndcg@10", "recall@50", "recall@200", "ild@10", "valid_recall@10", "coarse_valid_recall10",
        "epochs", "best_epoch", "train_s", "train_items_per_s"]
print("| run | " + " | ".join(cols) + " |")
for f in sorted(out.glob("*.jsonl")):
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.startswith("{")]
    if not rows:
        print(f"| {f.stem} | (no result: {(out / (f.stem + '.log')).read_text()[-200:]!r}) |")
    for r in rows:
        print(f"| {f.stem} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
EOF
# A call brings back at most 8 files: the runs' results and logs travel as one archive.
(cd "$OUT" && tar czf runs.tgz --remove-files ./*.jsonl ./*.log)
