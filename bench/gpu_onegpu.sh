#!/usr/bin/env bash
# The one-GPU measurements of issue 16 in one device call, each step bounded so that the results
# of the steps that finished always come back: the Triton kernel tests, Criteo-1TB's tables on one
# GPU (compact 1/8 plan, pad, fp32 and fp16, against plain TorchRec capped to the same table
# memory), then every search phase and both compact layouts beside plain TorchRec (gpu_suite.sh's
# kernels, criteo1tb_1gpu and phases_1gpu sections).
# Usage: RESULTS=DIR [BATCHES=65536] [PHASE_BATCHES=65536,131072] bash bench/gpu_onegpu.sh
set -uo pipefail
results=${RESULTS:?set RESULTS to the folder that collects the results}
work=/tmp/embdim_onegpu
mkdir -p "$results" "$work"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$results/gpu.txt"
OUT=$work timeout 90 bash bench/gpu_suite.sh kernels
cp "$work/kernels/log" "$results/kernels.log" 2>/dev/null
OUT=$work BATCHES=${BATCHES:-65536} timeout ${CRITEO_S:-300} bash bench/gpu_suite.sh criteo1tb_1gpu
cp "$work/criteo1tb_1gpu/results.jsonl" "$results/criteo1tb_1gpu.jsonl" 2>/dev/null
OUT=$work timeout ${PHASES_S:-330} bash bench/gpu_suite.sh phases_1gpu
cp "$work/phases_1gpu/results.jsonl" "$results/phases_1gpu.jsonl" 2>/dev/null
tail -c 20000 "$work/phases_1gpu/log" > "$results/phases.log" 2>/dev/null
python -m bench.bench_gpu --render "$results"/*.jsonl
