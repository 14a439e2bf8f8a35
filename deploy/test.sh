#!/usr/bin/env bash
# The test command: sets everything up, starts a real Kafka broker and PostgreSQL on fresh, throw-away data
# dirs (a long-lived broker's thousands of partitions would slow its start-up), runs pytest, stops and deletes them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/deploy/setup.sh"
cd "$ROOT"
if [[ -z "${LEADLEDGER_STATE:-}" ]]; then
  LEADLEDGER_STATE="$(mktemp -d /var/tmp/leadledger-test.XXXXXX)"
  OWN_STATE=1
fi
export LEADLEDGER_STATE
export LEADLEDGER_PG_DATA="${LEADLEDGER_PG_DATA:-$LEADLEDGER_STATE/pg}"
cleanup() {
  .venv/bin/leadledger infra down || true
  if [[ -n "${OWN_STATE:-}" ]]; then rm -rf "$LEADLEDGER_STATE"; fi
}
trap cleanup EXIT
.venv/bin/leadledger infra up
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
