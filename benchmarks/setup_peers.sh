#!/usr/bin/env bash
# Build a separate virtual environment with the peers that benchmarks/bench_peers.py compares
# against: SAELens (PyPI sae-lens) and EleutherAI's sparsify (PyPI eai-sparsify); and, for their
# fixtures only, dictionary_learning (PyPI dictionary-learning) and circuit-tracer (PyPI
# circuit-tracer), installed with --no-deps (their full requirements bring nnsight, transformer-lens
# pins and more; the fixture scripts use only their dictionary / transcoder classes and loaders,
# which need einops, PyYAML and huggingface_hub, all present after the peers above).
#
#   bash benchmarks/setup_peers.sh [VENV]        # default VENV: /tmp/peers-venv
#   PYTHONPATH=src VENV/bin/python benchmarks/bench_peers.py
#
# Never touches the project's own environment or dependencies. PyTorch is installed first, pinned
# to the project's version (the CPU build here: TORCH_SPEC, default torch==2.13.0), and every later
# install is constrained to it, so the peers' requirements cannot pull a second PyTorch or CUDA
# wheels; a dry run checks that before anything is installed. mechfaith itself is not installed:
# the benchmark imports it from src/ (PYTHONPATH).
set -euo pipefail

VENV="${1:-/tmp/peers-venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
PEERS=(sae-lens eai-sparsify)

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q "$TORCH_SPEC"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$CONSTRAINTS"
echo "constraints: $(cat "$CONSTRAINTS")"

# dry run first: refuse if anything would bring another torch, CUDA or Triton wheels
PLAN="$("${PIP[@]}" install --dry-run -c "$CONSTRAINTS" "${PEERS[@]}" 2>&1 | grep '^Would install' || true)"
echo "$PLAN"
if echo "$PLAN" | tr ' ' '\n' | grep -Ei '^(torch|nvidia-|triton)' ; then
    echo "setup_peers.sh: the peers' requirements would install the packages above; refusing" >&2
    exit 1
fi
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${PEERS[@]}" einops
"${PIP[@]}" install -q --no-deps dictionary-learning circuit-tracer
"$VENV/bin/python" - <<'EOF'
import torch, sae_lens, sparsify  # noqa: F401
print(f"ok: torch {torch.__version__}, sae-lens {sae_lens.__version__}")
EOF
echo "run: PYTHONPATH=src $VENV/bin/python benchmarks/bench_peers.py"
echo "fixtures: PYTHONPATH=src $VENV/bin/python benchmarks/make_{saelens,sparsify,dictionary_learning,circuit_tracer,circuit_tracer_clt}_fixtures.py"
