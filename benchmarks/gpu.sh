#!/usr/bin/env bash
# One command for a lent GPU: the CUDA tests, then the benchmark matrix, written under $OUT with the device's name
# and torch's version. About 7 minutes on an H100 (estimated: it has not run there yet), the last 2 the compiled rows
# (inductor's compiles: the slowest step, the one to lose if time runs out). DEVICE=cpu runs the same steps at tiny sizes (a slow test does, so the script is
# known to work before a GPU is spent on it).
#
#   benchmarks/gpu.sh                      # CUDA, results in benchmarks/results/gpu-<device>-<date>/
#   DEVICE=cpu OUT=/tmp/r benchmarks/gpu.sh
#
# Environment: DEVICE (cuda | cpu, default cuda), OUT (default benchmarks/results), PYTHON (default python3), LIMIT
# (seconds a step may run, default 150; the compiled step 3 x). A failing step is recorded in summary.md (124: it ran
# past its limit) and the script goes on; it exits non-zero if any step failed.
set -uo pipefail

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python3}
LIMIT=${LIMIT:-150}
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = cuda ]; then
    # model:batch:input side[:modes], as the issue asks: DenseNet-BC-100 b64, densenet121 b64, densenet121_3d b2 at
    # 96^3 (no MONAI row: its DenseNet runs plain autograd, as efficient=False does)
    MATRIX="densenet_bc_100_k12:64:32 densenet121_efficient:64:224 densenet121_3d:2:96:false,true,max"
    MODES=false,true,max,checkpoint REPEATS=5 WARMUP=2 BACKEND=inductor LARGEST=densenet121_efficient:224
    FUSED=densenet121_efficient:64:224  # the optimizer-in-backward row
    COMPILED=densenet_bc_100_k12:64:32  # naive and "max", eager and compiled (a minute or two of compiling each)
    TESTS=(-m cuda)
elif [ "$DEVICE" = cpu ]; then
    # The same steps at the tiniest sizes, so that a slow test proves the script: a 10-layer CIFAR model for the 2D
    # rows (bf16 with channels_last, compiled with the eager backend: inductor's CPU compile takes minutes), the 3D
    # network at batch 2, its smallest input and "max" alone, memory only, and a 16 MiB budget for plan.
    MATRIX="densenet_bc_10_k12:2:8 densenet121_3d:2:29:max"
    MODES=false,max REPEATS=0 WARMUP=0 BACKEND=eager LARGEST=densenet_bc_10_k12:8
    FUSED=densenet_bc_10_k12:2:8 COMPILED=densenet_bc_10_k12:2:8
    TESTS=(-m cuda tests/test_operator_count.py)  # selects nothing here: the step itself is what is checked
else
    echo "gpu.sh: DEVICE must be cuda or cpu, got '$DEVICE'" >&2
    exit 2
fi

info=$("$PYTHON" - "$DEVICE" <<'PY'
import sys, torch
device, cuda = sys.argv[1], torch.cuda.is_available()
if device == "cuda" and not cuda:
    sys.exit("gpu.sh: DEVICE=cuda but torch sees no CUDA device (torch " + torch.__version__ + ")")
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
free = torch.cuda.mem_get_info()[0] if device == "cuda" else 2**24  # plan's budget on CPU: a small one
print(name.replace(" ", "-"), torch.__version__, int(free * 0.85))
print("cuDNN", torch.backends.cudnn.version() if cuda else None, "| TF32 matmul", torch.backends.cuda.matmul.allow_tf32,
      "| TF32 cuDNN", torch.backends.cudnn.allow_tf32)
PY
) || exit 2
read -r NAME TORCH BUDGET <<<"$info"
DIR="$OUT/gpu-$NAME-$(date -u +%Y-%m-%d-%H%M)"
mkdir -p "$DIR" || exit 2
SUMMARY="$DIR/summary.md"
failed=0
start_all=$SECONDS

{
    echo "# gpu.sh on $NAME, torch $TORCH, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    tail -n 1 <<<"$info"
    echo
    echo "| step | seconds | result | output |"
    echo "| --- | --- | --- | --- |"
} >"$SUMMARY"

# step NAME COMMAND...: run it, its output in NAME.txt, a row in the summary
step() {
    local name=$1 begin=$SECONDS status
    shift
    echo "== $name: $*"
    "$@" >"$DIR/$name.txt" 2>&1
    status=$?
    [ $status -eq 0 ] || failed=1
    echo "| $name | $((SECONDS - begin)) | $([ $status -eq 0 ] && echo ok || echo "failed ($status)") | $name.txt |" >>"$SUMMARY"
    return $status
}

# py ARGS...: $PYTHON, killed after $LIMIT seconds (and its children: inductor's compile workers)
py() { timeout -k 10 "$LIMIT" "$PYTHON" "$@"; }

bench() { py -m densenet_efficient bench --device "$DEVICE" --repeats "$REPEATS" --warmup "$WARMUP" "$@"; }

cuda_tests() {
    py -m pytest -q -p no:cacheprovider "${TESTS[@]}"
    local status=$?
    [ $status -eq 5 ] && return 0  # no test selected: not a failure
    return $status
}

step cuda-tests cuda_tests

for entry in $MATRIX; do
    IFS=: read -r model batch side modes <<<"$entry"
    common=(--model "$model" --batch-size "$batch" --input-size "$side" --modes "${modes:-$MODES}")
    step "bench-$model-fp32" bench "${common[@]}" --json "$DIR/bench-$model-fp32.json"
    # On CPU, 3D average pooling has no bfloat16 kernel; CUDA's has.
    [ "$DEVICE" = cpu ] && [ "$model" = densenet121_3d ] && continue
    layout=(--channels-last)
    [ "$model" = densenet121_3d ] && layout=()  # channels_last is 4D; volumes keep their layout
    step "bench-$model-bf16" bench "${common[@]}" --dtype bf16 "${layout[@]}" --json "$DIR/bench-$model-bf16.json"
done

IFS=: read -r model batch side <<<"$FUSED"
step "bench-$model-optimizer-in-backward" bench --model "$model" --batch-size "$batch" --input-size "$side" \
    --modes false,max --optimizer-in-backward --json "$DIR/bench-$model-optimizer-in-backward.json"

# The largest batch per mode that plan predicts in 85 % of the free memory, each checked by a real step.
IFS=: read -r model side <<<"$LARGEST"
if step plan py -m densenet_efficient plan --memory "${BUDGET}B" --model "$model" \
    --input-size "$side" --json "$DIR/plan.json"; then
    for pair in $("$PYTHON" -c "import json, sys; print(' '.join(f\"{m['mode']}:{m['largest_batch']}\" for m in json.load(open(sys.argv[1]))['modes']))" "$DIR/plan.json"); do
        IFS=: read -r mode largest <<<"$pair"
        step "largest-batch-$mode-$largest" bench --model "$model" --batch-size "$largest" \
            --input-size "$side" --modes "$mode" --repeats 1 --warmup 0 \
            --json "$DIR/largest-batch-$mode.json"
    done
fi

IFS=: read -r model batch side <<<"$COMPILED"
LIMIT=$((3 * LIMIT)) step "bench-$model-compiled" bench --model "$model" --batch-size "$batch" --input-size "$side" \
    --modes false,max --compile --compile-backend "$BACKEND" --json "$DIR/bench-$model-compiled.json"

echo >>"$SUMMARY"
echo "Total: $((SECONDS - start_all)) s. Files: $DIR" >>"$SUMMARY"
cat "$SUMMARY"
exit $failed
