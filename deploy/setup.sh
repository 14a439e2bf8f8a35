#!/usr/bin/env bash
# Installs what leadledger needs on a fresh Debian machine: Java + Maven (to fetch and run Kafka),
# PostgreSQL 15, Chromium (browser test of the hot-lead board), a Python venv with the pinned dependencies. Idempotent; sourced by demo.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
command -v mvn  >/dev/null 2>&1 || need_apt+=(maven)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)   # the hot-lead board's browser test (driven by playwright)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "[setup] apt-get install ${need_apt[*]}"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ] || [ constraints.txt -nt .venv/.installed ]; then
  echo "[setup] installing Python dependencies (pinned by constraints.txt)"
  .venv/bin/python -m pip install -q --upgrade pip
  # the compiled modules are built in place below (the editable install would compile them once more, elsewhere)
  LEADLEDGER_PURE_PYTHON=1 .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
  touch .venv/.installed
fi
# the compiled modules (setup.py, Cython: the fold, the log fold, the wire format): rebuilt in place when a source or
# its .pxd changed (a no-op otherwise); LEADLEDGER_PURE_PYTHON=1 runs the plain sources instead
if [ "${LEADLEDGER_PURE_PYTHON:-}" != 1 ]; then
  .venv/bin/python setup.py -q build_ext --inplace 2> >(grep -v -e _BetaConfiguration -e 'warnings.warn(msg' >&2)
fi
