#!/usr/bin/env bash
# The test command: sets everything up, starts the real Kafka broker and PostgreSQL, runs pytest, stops them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/deploy/setup.sh"
cd "$ROOT"
.venv/bin/leadledger infra up
trap '.venv/bin/leadledger infra down || true' EXIT
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
