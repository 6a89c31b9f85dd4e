#!/usr/bin/env bash
# The built-in default job: generate a small synthetic Criteo-shaped data set, search embedding
# sizes and retrain the compact model on 2 CPU ranks, and print the test AUC.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
out="${1:-runs/demo}"
exec embdim demo --out "$out"
