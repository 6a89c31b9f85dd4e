#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
# -rs: list every skipped test with its reason (e.g. ../shared/data absent outside CI).
exec python -m pytest -q -rs tests "$@"
