#!/usr/bin/env bash
# HyMiRec on a lent GPU (the workplace's `device` machine), in one prepared call.
#
#   bench/gpu.sh smoke [SECONDS]   GPU tests + the model unit tests, then a 6-epoch ml-100k eval (timing)
#   bench/gpu.sh full  [SECONDS]   offline evals side by side on the one GPU, each cut at SECONDS
#
# That machine has torch and transformers but nothing of ours and no network, and one call carries at
# most 64 MiB, so the call carries, under .dev/ (git-ignored): whl/ (pydantic, pydantic-settings,
# gguf … as cp312 wheels), data/ (datasets exported by `hymirec datasets export`, as Parquet),
# cache/item_embeddings (SmolLM2 item content, so the item encoder is not rerun) and the user LLM:
# llm/*.gguf (SmolLM2 cut to its first blocks so that it fits), or the whole SmolLM2 GGUF in two
# halves ga/ and gb/ carried by two calls on one warm machine. Without one the user LLM is the tiny one.
# Results land in $OUT (JSON lines per run, logs) and a table is printed last.
set -u
mode=${1:-smoke}
limit=${2:-420}
OUT=${OUT:-/tmp/hymirec-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYMIREC_CACHE_DIR=$PWD/.dev/cache TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

data() { echo --interactions .dev/data/$1-interactions.parquet --items .dev/data/$1-items.parquet; }

gguf=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
user_llm=tiny
if ls .dev/llm/*.gguf >/dev/null 2>&1; then
    user_llm=$(ls .dev/llm/*.gguf | head -1)
elif [ -f .dev/ga/part ] && [ -f .dev/gb/part ]; then
    mkdir -p /tmp/smollm2 && cat .dev/ga/part .dev/gb/part > $gguf
    if [ "$(sha256sum $gguf | cut -d' ' -f1)" = b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 ]; then
        user_llm=$gguf
    fi
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
export OMP_NUM_THREADS=3
while sleep 30; do date +%T; free -m | sed -n 2p; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done \
    > "$OUT/monitor.log" 2>&1 &
monitor=$!
run() {  # name dataset model backbone seed
    [ -f .dev/data/$2-interactions.parquet ] || return 0
    timeout "$limit" python3 -m hymirec.cli eval $(data $2) --model $3 --backbone $4 --item-encoder smollm2 \
        --seed $5 --json > "$OUT/$1.jsonl" 2> "$OUT/$1.log" &
}
run ml100k-llm-s0 ml-100k hymirec "$user_llm" 0
run ml100k-llm-s1 ml-100k hymirec "$user_llm" 1
run ml100k-tiny-s0 ml-100k hymirec tiny 0
run ml100k-sasrec200-s0 ml-100k sasrec-200 tiny 0
run synthetic-llm-s0 synthetic hymirec "$user_llm" 0
wait $(jobs -p | grep -v "^$monitor$")
kill $monitor
tail -4 "$OUT/monitor.log"
python3 - "$OUT" "$user_llm" <<'EOF'
import json, sys
from pathlib import Path
out, user_llm = Path(sys.argv[1]), sys.argv[2]
print(f"user LLM of the *-llm-* runs: {user_llm}")
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
