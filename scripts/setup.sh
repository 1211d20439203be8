#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Idempotent: re-runs are instant
# unless pyproject.toml changed. Needs Python 3.11+ and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.mmprm-installed"
# The browser tests drive Debian's chromium (never a browser that Playwright downloads). Installed
# when missing where apt-get can; elsewhere those tests are skipped with the reason shown.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "setup: could not install chromium; the browser tests will be skipped" >&2
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: an open range (as transformers/accelerate ask) would pull a CUDA build of
# several GB. On machines with a local CPU wheel, pip takes it from there.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
