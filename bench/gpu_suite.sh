#!/usr/bin/env bash
# The GPU benchmark tables of BENCHMARKS.md, one section per argument (each fits one 10-minute
# device call on 4 H200s). Results land in ${OUT:-/tmp/embdim_gpu}/<section>/ (bench_gpu.md,
# results.jsonl, log). Usage: bash bench/gpu_suite.sh SECTION ..., SECTION one of tw rw scale parquet
# compact10m bf16comm criteo1tb_1gpu phases_1gpu rw_multihot_1gpu kernels.
# RANKS / RANKS_RW override the rank counts of tw and bf16comm / rw (e.g. RANKS=1,2,4,8 on an 8-GPU machine),
# BATCHES the batch sizes of parquet, LOADER_WORKERS its loader processes per rank (default 6).
set -uo pipefail
out=${OUT:-/tmp/embdim_gpu}
common=(--dim 128 --set optim.sparse_optimizer=rowwise_adagrad --set mlet.inner_dim=256 --set pme.saliency_batches=4)
all=plain,full,search_optembed,search_mlet,search_amtl,search_pme,compact_fixed,compact_pme
# References for the compact models: plain TorchRec at width 32 (the ceiling of a 4x-compressed
# model) and the sharded EBC alone at 128 and 32 (the embedding-bound share of the step).
refs=plain_d32,ebc,ebc_d32
for section in "$@"; do
  mkdir -p "$out/$section"
  case $section in
    tw) args=(--ranks ${RANKS:-1,2,4} --shardings table_wise --rows-per-table 1000000 --batch-sizes 8192,65536,131072
              --variants $all,$refs --warmup 3 --steps 15) ;;
    rw) args=(--ranks ${RANKS_RW:-2,4} --shardings row_wise --rows-per-table 1000000 --batch-sizes 8192,65536,131072
              --variants $all,$refs --warmup 3 --steps 15) ;;
    # Criteo-1TB-shaped: 26 fields, cardinalities capped at 40M, width 128, row-wise over 4 GPUs;
    # one field-level (OptEmbed supernet) and one mask-aware (PME, with its plan export at scale).
    scale) args=(--ranks 4 --shardings row_wise --cardinalities criteo-1tb --cardinality-cap 40000000
                 --batch-sizes 65536 --variants plain,search_optembed,search_pme,compact_pme --warmup 3 --steps 15
                 --skeleton-rows 200000) ;;
    # Parquet streaming against memory, 2 GPUs, the same model and tables.
    parquet) args=(--ranks 2 --shardings table_wise --rows-per-table 1000000 --batch-sizes ${BATCHES:-16384,65536}
                   --variants full,full_parquet --warmup 3 --steps 30 --skeleton-rows 8000000
                   --loader-workers ${LOADER_WORKERS:-6}) ;;
    # The compact models in the setting (2 GPUs, 26 x 10M rows): the full DLRM step and the
    # embedding-bound regime (EBC alone) at widths 128 and 32 and as the compact module.
    compact10m) args=(--ranks ${RANKS_10M:-2} --shardings table_wise --rows-per-table 10000000
                      --batch-sizes 65536,131072 --warmup 3 --steps 15
                      --variants plain,compact_fixed,plain_d32,ebc,ebc_d32,ebc_compact_fixed) ;;
    # Weak scaling with the embedding all-to-all in bf16 (sharding.comm_precision), against fp32 above.
    bf16comm) args=(--ranks ${RANKS:-1,2,4} --shardings table_wise --rows-per-table 1000000 --batch-sizes 65536,131072
                    --variants plain,full --warmup 3 --steps 15 --set sharding.comm_precision=bf16) ;;
    # One GPU, Criteo-1TB's 26 tables uncapped (178M rows; 85 GiB at D = 128 in fp32): the compact
    # model of a 1/8 plan (fixed, pad) over all the rows, against plain TorchRec capped to the same
    # table memory (3,951,199 rows per table = 1/8 of the rows); the same plan with fp16 tables
    # against plain capped to 1/16 (1,726,896 rows per table), and plain over all the rows last
    # (it fits an H200, not an H100).
    criteo1tb_1gpu) args=(--ranks 1 --shardings table_wise --cardinalities criteo-1tb --budget 0.125
                          --batch-sizes ${BATCHES:-65536,131072} --warmup 3 --steps 15 --skeleton-rows 200000
                          --variants plain_cap3951199,compact_fixed,compact_fixed_project,plain_cap1726896,compact_fixed_fp16,plain_cap3951199_fp16,plain) ;;
    # One GPU, 26 x 1M rows: every search phase and the compact models in both layouts (the same
    # plans) beside plain TorchRec, the full step and the EBC alone, fp32 and fp16 tables.
    # PHASE_BATCHES overrides the batch sizes.
    phases_1gpu) args=(--ranks 1 --shardings table_wise --rows-per-table 1000000
                       --batch-sizes ${PHASE_BATCHES:-65536,131072} --warmup 3 --steps 10
                       --variants plain,search_optembed,search_optembed_notriton,search_amtl,search_mlet,search_pme,compact_pme,compact_pme_project,compact_fixed,compact_fixed_project,compact_fixed_fp16,full_fp16,ebc,ebc_compact_fixed,ebc_compact_fixed_project) ;;
    # One GPU, row-wise sharding and 4 multi-hot fields (bags of 8 ids on average).
    rw_multihot_1gpu) args=(--ranks 1 --shardings row_wise --rows-per-table 1000000 --batch-sizes 65536
                            --warmup 3 --steps 15 --multi-hot-fields 4 --multi-hot-mean 8
                            --variants plain,full,search_optembed,search_pme,compact_pme,compact_fixed,compact_fixed_project) ;;
    # The Triton kernels against the torch formulas they replace, on this GPU (pytest).
    kernels) python -m pytest -q -rs tests/test_fused_kernels.py > "$out/$section/log" 2>&1; echo "== $section: exit $?"
             tail -3 "$out/$section/log"; continue ;;
    *) echo "unknown section $section (see the usage line)" >&2; exit 2 ;;
  esac
  python -m bench.bench_gpu "${args[@]}" "${common[@]}" --out "$out/$section" > "$out/$section/log" 2>&1
  echo "== $section: exit $?"
  sed -n '/^| GPUs/,$p' "$out/$section/bench_gpu.md" 2>/dev/null || tail -5 "$out/$section/log"
done
