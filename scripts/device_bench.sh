#!/usr/bin/env bash
# The one script sent to the GPU machine: install the carried wheels, run every bench row, and leave
# JSON results and logs under $OUT. Call through the device tool with carry ["wheels"]:
#   bash scripts/device_bench.sh [train] [predict] [qlora] [equal]   (no argument: the first three)
# equal: reference and project only, 16 steps, for the loss-curve comparison.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-wheels}/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, trl, peft; print(torch.__version__, torch.version.cuda, transformers.__version__, trl.__version__, peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"
parts=${*:-train predict qlora}
for part in $parts; do
  case $part in
    train) cmd=(train qwen2.5-vl-3b --steps 8 --warmup 2 --ablations); limit=330 ;;
    equal) cmd=(train qwen2.5-vl-3b --steps 14 --warmup 2); limit=250 ;;
    predict) cmd=(predict qwen2.5-vl-3b --images 128 --predict-batch-sizes 32); limit=110 ;;
    qlora) cmd=(qlora qwen2-vl-7b --batch-size 1 --steps 4); limit=200 ;;
    *) echo "unknown part $part"; continue ;;
  esac
  echo "== $part: python3 -m vlmexp.bench ${cmd[*]}"
  timeout "$limit" python3 -m vlmexp.bench "${cmd[@]}" --out "$OUT/$part.json" 2>&1 | tee "$OUT/$part.log" | grep -v "Writing model shards"
  echo "== $part exit ${PIPESTATUS[0]}"
done
