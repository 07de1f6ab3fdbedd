#!/usr/bin/env bash
# Set up on first use, then run the service: web, worker and (if needed) Redis.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
    echo "installing dependencies into .venv ..."
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
    touch .venv/.installed
fi
exec .venv/bin/python launcher.py
