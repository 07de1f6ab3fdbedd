#!/usr/bin/env bash
# Set up on first use, then run the service: web, worker and (if needed) Redis.
set -euo pipefail
cd "$(dirname "$0")"

case "${1:-}" in
    -h|--help)
        echo "usage: ./run.sh"
        echo "Runs the web server, the worker and, if nothing answers at REDIS_URL,"
        echo "a private redis-server. Settings come from .env or the environment;"
        echo "see README.md and .env.example. Ctrl-C or SIGTERM stops everything."
        exit 0 ;;
esac

if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
    echo "installing dependencies into .venv ..."
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
    touch .venv/.installed
fi
exec .venv/bin/python launcher.py
