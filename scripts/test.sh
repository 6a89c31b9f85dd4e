#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
exec python -m pytest -q tests "$@"
