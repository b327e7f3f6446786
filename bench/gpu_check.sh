#!/usr/bin/env bash
# One prepared GPU session: CUDA correctness (tests, the CLI end to end) and the benchmarks at 224 px.
# Run from the repository root on a CUDA machine:  bash bench/gpu_check.sh [OUT_DIR]
# Writes into OUT_DIR (default $OUT, else ./gpu-out): log.txt, pre.json, views.json, stream.json,
# feat.json, variants.json, demo-summary.json.
# MEDSSL_CHECK_STEPS picks steps (default: pre views stream feat tests cli variants), in that order. Each
# step has its own time limit, so one slow or failing step leaves the others' results.
# MEDSSL_CHECK_DEVICE=cpu MEDSSL_CHECK_QUICK=1 dry-runs it on a CPU. Packages the machine lacks
# (mimeta-pytorch and its imports) can travel as wheels in ./.whl (see bench/README.md).
set -u
OUT=${1:-${OUT:-gpu-out}}
mkdir -p "$OUT"
DEV=${MEDSSL_CHECK_DEVICE:-cuda}
QUICK=${MEDSSL_CHECK_QUICK:-0}
LOG="$OUT/log.txt"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 MEDSSL_RUNS="$WORK/runs" COLUMNS=200

FAILED=""
step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to log.txt, print the tail
    local name=$1 limit=$2 s rc
    shift 2
    s=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    timeout -k 15 "$limit" "$@" >>"$LOG" 2>&1  # -k: medssl takes SIGTERM as a graceful stop
    rc=$?
    echo "=== $name rc=$rc $(($(date +%s) - s))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
}

# Packages the machine lacks travel as wheels in .whl (mimeta-pytorch, torchcross); medssl itself is
# installed without touching the machine's torch.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1 || echo "pip -e failed" >>"$LOG"
{
    date -u
    nvidia-smi -L 2>/dev/null
    python3 -c "import torch, torchvision, mimeta; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'bf16', torch.cuda.is_bf16_supported() if torch.cuda.is_available() else '')"
    nproc
} 2>&1 | tee -a "$LOG"

# Synthetic organ planes at 224 px for the feature benchmark, written in the background meanwhile
# (niced, one thread: the timed host-side pipeline steps run at the same time on this machine).
SYNTH=""
case "$QUICK ${MEDSSL_CHECK_STEPS:-feat}" in 0*feat*) OMP_NUM_THREADS=1 nice -n 19 python3 - "$WORK/cache/organs-224px-1645" <<'EOF' >>"$LOG" 2>&1 &
import sys, time
from pathlib import Path
from medssl_cli.data.synth import make_synthetic
t = time.perf_counter()
make_synthetic(Path(sys.argv[1]), organs=1645, size=224, seed=0, which=("organs",), overwrite=True)
print(f"[synth] 3 x 1645 organ items at 224 px in {time.perf_counter() - t:.0f} s")
EOF
    SYNTH=$! ;;
esac

if [ "$QUICK" = 1 ]; then
    B="--quick"; TESTS="tests/test_augment.py"; DEMO_EPOCHS=1
else
    B=""; TESTS="tests/test_augment.py tests/test_feed.py tests/test_pretrain.py tests/test_finetune.py tests/test_evaluate.py tests/test_chunked.py tests/test_optim.py tests/test_probes.py"
    DEMO_EPOCHS=30
fi

tests() {  # the recipes' device is auto, so on a GPU machine these train and evaluate on CUDA
    step pytest 160 python3 -m pytest -q -p no:cacheprovider $TESTS
    sed -n '/^=== pytest /,$p' "$LOG" | grep -E "passed|failed|error" | tail -n 3  # this step's lines only
}
cli() {  # pretrain (demo recipe, compiled), linear + full fine-tuning, evaluate, report, on the device
    step synth64 30 medssl data synth --out "$WORK/data" --size 64
    step pretrain 90 medssl pretrain --recipe recipes/demo.yaml --data-dir "$WORK/data" --device "$DEV" --epochs "$DEMO_EPOCHS" --compile
    step finetune 60 medssl finetune --init ssl,random --mode linear,full --fraction 0.1,1 --seeds 0 --epochs 5 --device "$DEV"
    step evaluate 30 medssl evaluate --device "$DEV"
    step report 20 medssl report
    find "$WORK/runs" -name summary.json -exec cp {} "$OUT/demo-summary.json" \; 2>/dev/null
    grep -hE "Pretraining on|finished|samples/s" "$WORK"/runs/pretrain-*/log.txt 2>/dev/null | tail -n 4 | tee -a "$LOG"
}
pre() {  # pretraining throughput at the study's batch (256), training images on the device
    step bench_pre 110 python3 bench/pretrain_throughput.py --devices "$DEV" --sizes 224,64 --batches 256 --rounds 4 --target-s 1.5 --profile-views $B --json "$OUT/pre.json"
}
views() {  # B/A with the views compiled and/or the blur as banded matmuls (same rounds as the default)
    step bench_views 200 python3 bench/pretrain_throughput.py --devices "$DEV" --sizes 224 --batches 256 --view-variants --rounds 3 --target-s 1.0 $B --json "$OUT/views.json"
}
stream() {  # the same at 224 px with the images streamed from pinned host memory
    step bench_stream 50 python3 bench/pretrain_throughput.py --devices "$DEV" --sizes 224 --batches 256 --device-budget-gb 0 --rounds 3 --target-s 1.5 $B --json "$OUT/stream.json"
}
feat() {  # feature extraction B/A and the linear grid at 224 px (organs-sized synthetic data)
    [ -n "$SYNTH" ] && wait "$SYNTH"
    step bench_feat 100 python3 bench/features_throughput.py --devices "$DEV" --size 224 --cache-dir "$WORK/cache" $B --json "$OUT/feat.json"
}
variants() {  # defaults: dtype x memory format, foreach vs fused Adam, cudnn.benchmark, torch.compile
    step bench_variants 150 python3 bench/pretrain_throughput.py --devices "$DEV" --sizes 224 --batches 256 --variants --compile --rounds 2 --warmup 1 --target-s 1.0 $B --json "$OUT/variants.json"
}

for s in ${MEDSSL_CHECK_STEPS:-pre views stream feat tests cli variants}; do "$s"; done
rm -rf "$WORK"
echo "done $(date -u)${FAILED:+; steps that failed or ran out of time:$FAILED}" | tee -a "$LOG"
[ -z "$FAILED" ]  # the exit status says whether every step passed
