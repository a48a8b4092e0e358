#!/usr/bin/env bash
# The one script sent to the GPU machine: install the carried wheels, run every bench row, and leave
# JSON results and logs under $OUT. Call through the device tool with carry [".whl"] (trl, transformers,
# datasets, omegaconf wheels for Python 3.12; see docs/performance.md):
#   WHEELS=.whl bash scripts/device_bench.sh [train] [predict] [qlora] [equal] [compile]
# (no argument: the first three); compile: a speed.compile=true row beside a plain project row;
# levers: language-only rows: reference at batch 8 and 16, project, project with speed.compile at 8 and 16;
# predict-compile: predict plus a warm speed.compile=true row at batch 32; levers32: a compiled
# batch-32 row; predict64: prediction at batch 8 and 64; predict32: at batch 32 only (reference too);
# levers24: a compiled batch-24 row alone; gputests: every gpu-marked test under tests/; smoke: a tiny-model
# `exp run` on CUDA with speed.compile=true (the levers logged once a run); gemma-train, gemma-predict:
# the Gemma-3-4B shape's rows (issue 16).
# equal: reference and project only, 16 steps, for the loss-curve comparison.
# parallel (on nvidia-h200-x2): `exp run folds=2` with gpus=2 against gpus=1, wall time of each.
# Whole runs (`exp bench run`, one part per device call: each stays under the 10-minute limit):
# run: `exp run folds=5 train.epochs=2` on the demo with the random-weight 3B saved locally, wall time by
# phase, plus the step bench's steady state on the same rows; run-levers: the same run with
# speed.compile=true train.batch_size=auto speed.vision_compile=true; run-prepass: the defaults plus
# speed.vision_prepass=true; run-project: the defaults, project part only, in the shared workdir /tmp/wr
# (demo and saved model made once); run-compile: the same with speed.compile=true, and run-compile-warm
# the same again in a new process (torch.compile's on-disk caches warm, as a second `exp run` finds
# them); run-compile-dynamic: speed.compile with dynamic shapes (run W: unfinished at 230 s);
# run-qlora: the 7B QLoRA whole run (Qwen2-VL-7B shape, model.quant=4bit, batch 4, 1 epoch by
# default to stay under the call limit; needs the bitsandbytes wheel in $WHEELS; run X); run-ref: the tutorial recipe
# (trl defaults, generate) on fold 0 of the same split, scaled to 5 folds; vision: the vision tower
# alone (32 images of 448 px), plain / batched windows / MLP padded / + host-computed inputs / + blocks compiled, images/s and max difference;
# run-cudnn: run-project with speed.cudnn_attention=true (the SDPA backends before run U);
# run-steady: the steady-state rows alone (SET="speed.compile=true" adds overrides; with
# VLMEXP_PROFILE_DIR each row's profile says what the GPU's idle gaps wait for, bench/gaps.py);
# run-profile: run-project under py-spy (needs the py-spy wheel in $WHEELS), raw stacks to attribute
# the phases' seconds and "other".
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
if [[ " $parts " == *" parallel "* ]]; then
  # exp run gpus=2 folds=2 vs gpus=1 folds=2: a random-weight Qwen2.5-VL-3B saved locally, the demo data.
  python3 -c "
import torch
from vlmexp.bench.shapes import build_model, build_processor, get_shape
from vlmexp.demo import make_demo
sh = get_shape('qwen2.5-vl-3b')
build_model(sh, 'cuda', torch.bfloat16).save_pretrained('/tmp/m3b')
build_processor(sh, 448).save_pretrained('/tmp/m3b')
make_demo('/tmp/demo')" 2>&1 | grep -v "Writing model shards"
  common=(folds=2 model.name=/tmp/m3b data.dir=/tmp/demo data.limit=${LIMIT:-240} train.epochs=1 leaderboard=/tmp/lb.csv)
  for g in 1 2; do
    start=$(date +%s%N)
    timeout 280 python3 -m vlmexp.cli run gpus=$g runs_dir=/tmp/runs$g "${common[@]}" > "$OUT/parallel_gpus$g.log" 2>&1
    rc=$?
    echo "gpus=$g exit $rc wall_ms $(( ($(date +%s%N) - start) / 1000000 ))" | tee -a "$OUT/parallel.txt"
    tail -3 "$OUT/parallel_gpus$g.log"
  done
  cat /tmp/runs*/*/cv.json > "$OUT/parallel_cv.json" 2>/dev/null
  parts=${parts//parallel/}
fi
for part in $parts; do
  case $part in
    train) cmd=(train qwen2.5-vl-3b --steps 8 --warmup 2 --ablations); limit=380 ;;
    levers) cmd=(train qwen2.5-vl-3b --steps 8 --warmup 2 --modules language
        --rows reference-b16:batch_size=16 project-compile:compile=true
        project-compile-b16:compile=true,batch_size=16); limit=330 ;;
    levers32) cmd=(train qwen2.5-vl-3b --steps 8 --warmup 2 --modules language --no-reference
        --rows project-compile-b32:compile=true,batch_size=32); limit=200 ;;
    levers24) cmd=(train qwen2.5-vl-3b --steps 8 --warmup 2 --modules language --no-reference --only-rows
        --rows project-compile-b24:compile=true,batch_size=24); limit=170 ;;
    run) cmd=(run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts project,steady); limit=570 ;;
    run-levers) cmd=(run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts project
        --set speed.compile=true train.batch_size=auto speed.vision_compile=true); limit=570 ;;
    run-prepass) cmd=(run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts project
        --set speed.vision_prepass=true); limit=570 ;;
    run-project) cmd=(run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts project${STEADY:+,steady} --workdir /tmp/wr)
        limit=${LIMIT_RUN:-260} ;;
    run-profile) echo "== run-profile: run-project under py-spy (all threads' stacks, idle included, 50 Hz)"
        mkdir -p /tmp/wr
        timeout ${LIMIT_RUN:-300} /tmp/site/bin/py-spy record --idle --threads -r 50 -f raw -o "$OUT/run-profile.txt" -- \
          python3 -m vlmexp.bench run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts project --workdir /tmp/wr \
          --out "$OUT/run-profile.json" > "$OUT/run-profile.log" 2>&1
        echo "exit $?"; grep -A30 '"phases"' "$OUT/run-profile.log" | head -32; continue ;;
    run-steady) cmd=(run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts steady --workdir /tmp/wr
        ${SET:+--set $SET}); limit=${LIMIT_RUN:-240} ;;
    run-cudnn) cmd=(run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts project --workdir /tmp/wr
        --set speed.cudnn_attention=true); limit=${LIMIT_RUN:-260} ;;
    run-compile|run-compile-warm) cmd=(run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts project
        --workdir /tmp/wr --set speed.compile=true); limit=${LIMIT_RUN:-240} ;;
    run-compile-dynamic) cmd=(run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts project
        --workdir /tmp/wr --set speed.compile=true speed.compile_dynamic=true); limit=${LIMIT_RUN:-300} ;;
    run-qlora) cmd=(run --model qwen2-vl-7b --folds 5 --epochs ${EPOCHS:-1} --parts project
        --set model.quant=4bit train.batch_size=${BATCH:-4}); limit=570 ;;
    run-ref) cmd=(run --model qwen2.5-vl-3b --folds 5 --epochs 2 --parts reference --reference-folds 1)
        limit=500 ;;
    vision) cmd=(vision qwen2.5-vl-3b --images 32); limit=300 ;;
    gputests) echo "== gputests"; timeout 200 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/ 2>&1 | tail -12
        continue ;;
    smoke) echo "== smoke: a tiny-model exp run on CUDA with speed.compile (levers prepared once a run)"
        python3 -m vlmexp.cli demo /tmp/demo > /dev/null 2>&1
        timeout 200 python3 -m vlmexp.cli run model.name=tiny:qwen2_5_vl data.dir=/tmp/demo data.limit=60 folds=2 \
          train.epochs=1 speed.compile=true runs_dir=/tmp/runs leaderboard=/tmp/lb.csv > "$OUT/smoke.log" 2>&1
        echo "exit $? speed-levers-lines $(grep -c 'speed levers' "$OUT/smoke.log")"; grep "speed levers" "$OUT/smoke.log"
        tail -4 "$OUT/smoke.log"; continue ;;
    predict32) cmd=(predict qwen2.5-vl-3b --images 160 --batch-size 32); limit=200 ;;
    predict64) cmd=(predict qwen2.5-vl-3b --images 192 --predict-batch-sizes 64); limit=200 ;;
    predict-compile) cmd=(predict qwen2.5-vl-3b --images 128 --predict-batch-sizes 32 --compile); limit=230 ;;
    compile) cmd=(train qwen2.5-vl-3b --steps 8 --warmup 2 --modules language --no-reference --compile); limit=300 ;;
    equal) cmd=(train qwen2.5-vl-3b --steps 14 --warmup 2); limit=250 ;;
    predict) cmd=(predict qwen2.5-vl-3b --images ${IMAGES:-128} --predict-batch-sizes 32); limit=${LIMIT_PRED:-170} ;;
    gemma-train) cmd=(train gemma-3-4b --steps 8 --warmup 2 --modules language); limit=300 ;;
    gemma-predict) cmd=(predict gemma-3-4b --images 128 --predict-batch-sizes 32); limit=200 ;;
    qlora) cmd=(qlora qwen2-vl-7b --batch-size 1 --steps 4); limit=200 ;;
    *) echo "unknown part $part"; continue ;;
  esac
  echo "== $part: python3 -m vlmexp.bench ${cmd[*]}"
  timeout "$limit" python3 -m vlmexp.bench "${cmd[@]}" --out "$OUT/$part.json" 2>&1 | tee "$OUT/$part.log" | grep -v "Writing model shards"
  echo "== $part exit ${PIPESTATUS[0]}"
done
