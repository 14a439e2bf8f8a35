#!/usr/bin/env bash
# The demo command: sets everything up, starts Kafka + PostgreSQL and the services, sends a few
# journeys through the ingest API and shows what the system made of them. Ctrl-C stops everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/deploy/setup.sh"
cd "$ROOT"
exec .venv/bin/leadledger stack --demo "$@"
