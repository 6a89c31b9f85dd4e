#!/usr/bin/env bash
# The GPU benchmark tables of BENCHMARKS.md, one section per argument (each fits one 10-minute
# device call on 4 H200s). Results land in ${OUT:-/tmp/embdim_gpu}/<section>/ (bench_gpu.md,
# results.jsonl, log). Usage: bash bench/gpu_suite.sh tw|rw|scale|parquet|bf16comm ...
# RANKS / RANKS_RW override the rank counts of tw / rw (e.g. RANKS=1,2,4,8 on an 8-GPU machine).
set -uo pipefail
out=${OUT:-/tmp/embdim_gpu}
common=(--dim 128 --set optim.sparse_optimizer=rowwise_adagrad --set mlet.inner_dim=256 --set pme.saliency_batches=4)
all=plain,full,search_optembed,search_mlet,search_amtl,search_pme,compact_fixed,compact_pme
for section in "$@"; do
  mkdir -p "$out/$section"
  case $section in
    tw) args=(--ranks ${RANKS:-1,2,4} --shardings table_wise --rows-per-table 1000000 --batch-sizes 8192,65536,131072
              --variants $all --warmup 3 --steps 15) ;;
    rw) args=(--ranks ${RANKS_RW:-2,4} --shardings row_wise --rows-per-table 1000000 --batch-sizes 8192,65536,131072
              --variants $all --warmup 3 --steps 15) ;;
    # Criteo-1TB-shaped: 26 fields, cardinalities capped at 40M, width 128, row-wise over 4 GPUs;
    # one field-level (OptEmbed supernet) and one mask-aware (PME, with its plan export at scale).
    scale) args=(--ranks 4 --shardings row_wise --cardinalities criteo-1tb --cardinality-cap 40000000
                 --batch-sizes 65536 --variants plain,search_optembed,search_pme,compact_pme --warmup 3 --steps 15
                 --skeleton-rows 200000) ;;
    # Parquet streaming against memory, 2 GPUs, the same model and tables.
    parquet) args=(--ranks 2 --shardings table_wise --rows-per-table 1000000 --batch-sizes 16384,65536
                   --variants full,full_parquet --warmup 3 --steps 30 --skeleton-rows 8000000 --loader-workers 6) ;;
    # Weak scaling with the embedding all-to-all in bf16 (sharding.comm_precision), against fp32 above.
    bf16comm) args=(--ranks 1,2,4 --shardings table_wise --rows-per-table 1000000 --batch-sizes 65536,131072
                    --variants plain,full --warmup 3 --steps 15 --set sharding.comm_precision=bf16) ;;
    *) echo "unknown section $section (tw, rw, scale, parquet, bf16comm)" >&2; exit 2 ;;
  esac
  python -m bench.bench_gpu "${args[@]}" "${common[@]}" --out "$out/$section" > "$out/$section/log" 2>&1
  echo "== $section: exit $?"
  sed -n '/^| GPUs/,$p' "$out/$section/bench_gpu.md" 2>/dev/null || tail -5 "$out/$section/log"
done
