#!/usr/bin/env bash
# Interop against the real libraries, in one command (not run in CI): build (or reuse) the peers'
# separate environment, regenerate every committed format fixture with the library that owns the
# format, and load mechfaith's exports of every kind in that library, printing the largest difference
# per kind. The tests in CI (tests/lm/test_*_fixtures.py, test_circuit_tracer_format.py,
# test_circuit_tracer_clt.py) then check mechfaith against the regenerated files without the libraries.
#
#   bash benchmarks/check_formats.sh [VENV]      # default VENV: /tmp/peers-venv (built if missing)
#
# Each fixture script exits non-zero if a difference exceeds 1e-5 or a refusal is missing; this
# script runs them all and fails if any failed. `git status tests/fixtures` afterwards shows whether a
# library changed what it writes.
set -uo pipefail

cd "$(dirname "$0")/.."
VENV="${1:-/tmp/peers-venv}"
if ! "$VENV/bin/python" -c "import sae_lens, sparsify, dictionary_learning, circuit_tracer" >/dev/null 2>&1; then
    bash benchmarks/setup_peers.sh "$VENV" || exit 2
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
failed=()
for lib in saelens sparsify dictionary_learning circuit_tracer circuit_tracer_clt; do
    echo "=== $lib"
    if ! "$VENV/bin/python" "benchmarks/make_${lib}_fixtures.py"; then
        failed+=("$lib")
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "check_formats: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "check_formats: every library's fixtures regenerated and every export loaded within 1e-5"
