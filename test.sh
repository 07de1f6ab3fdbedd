#!/usr/bin/env bash
# Set up on first use, then run every check: lint, format, tests.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f .venv/.installed-dev ] || [ requirements.txt -nt .venv/.installed-dev ] \
        || [ requirements-dev.txt -nt .venv/.installed-dev ]; then
    echo "installing dependencies into .venv ..."
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
    touch .venv/.installed .venv/.installed-dev
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
