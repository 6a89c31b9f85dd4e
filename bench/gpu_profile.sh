#!/usr/bin/env bash
# Profiles behind BENCHMARKS.md's "Why the misses" (issue #6), one 10-minute device call on 2 GPUs:
# every variant on 1 GPU, then the rank-dependent ones on 2 GPUs (rank 0 profiled). 26 x 1M rows,
# width 128, batch 65536 per GPU. Output under ${OUT:-/tmp/embdim_prof}: prof1.txt / prof1.jsonl
# (1 GPU), prof2.txt (rank 0 of 2) and prof2.jsonl. Usage: bash bench/gpu_profile.sh
# VARIANTS1 / VARIANTS2 override the variants of the 1-GPU / 2-GPU runs.
set -uo pipefail
out=${OUT:-/tmp/embdim_prof}
mkdir -p "$out"
common=(--rows-per-table 1000000 --dim 128 --batch-size 65536 --set optim.sparse_optimizer=rowwise_adagrad
        --set mlet.inner_dim=256 --set pme.saliency_batches=4 --warmup 3 --timed-steps 10 --steps 3
        --stack --by-shape --top 40 --out /tmp/embdim_prof_data)
CUDA_VISIBLE_DEVICES=0 python -m bench.profile_step "${common[@]}" --sync-debug --json "$out/prof1.jsonl" \
  --variants ${VARIANTS1:-plain,plain_d32,ebc,ebc_d32,compact_fixed,ebc_compact_fixed,search_optembed,search_mlet,search_amtl,search_pme} \
  > "$out/prof1.txt" 2>&1
echo "== 1 GPU: exit $?"
python -m torch.distributed.run --standalone --nproc-per-node 2 --tee 3 --local-ranks-filter 0 \
  -m bench.profile_step "${common[@]}" --json "$out/prof2.jsonl" \
  --variants ${VARIANTS2:-plain,ebc,compact_fixed,ebc_compact_fixed,search_pme,search_amtl} > "$out/prof2.txt" 2>&1
echo "== 2 GPUs: exit $?"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
for name in ("prof1.jsonl", "prof2.jsonl"):
    path = Path(sys.argv[1]) / name
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        print(f"{name} {r['variant']:>20} {r['step_ms_unprofiled']:8.2f} ms unprofiled, "
              f"{r.get('profiled_self_ms_per_step', 0):8.2f} ms profiled self")
PY
