#!/usr/bin/env bash
# Issue #5's large synthetic quality run on one 4-GPU machine: 50M planted-truth rows, the
# full-width baseline, then methods at 1/8 of its embedding parameters, 1 epoch each, one seed
# (AMTL warm-started from that baseline).
# Metrics are copied to ${OUT:-/tmp/embdim_quality}/<run>/ as each run ends.
# Usage: [NPROC=4] [SETS="--set k=v ..."] bash bench/gpu_quality.sh [rows] [methods...]
# NPROC: GPUs (one rank each); SETS: extra overrides for every phase (e.g. --set search.layout=project).
set -uo pipefail
rows=${1:-50000000}; shift || true
methods=${*:-optembed mlet pme}
out=${OUT:-/tmp/embdim_quality}; work=/tmp/embdim_quality_work
mkdir -p "$out" "$work"
E="python -m embdim.launch.main"
S=(--set data.batch_size=16384 --set data.eval_batch_size=131072 --set model.embedding_dim=64
   --set "model.dense_arch_layer_sizes=[512,256,64]" --set "model.over_arch_layer_sizes=[512,256,1]"
   --set data.num_workers=4 --set train.progress_bar=false --set optim.sparse_optimizer=rowwise_adagrad
   --set optembed.generations=10 ${SETS:-})
nproc=${NPROC:-4}
t0=$(date +%s)
[ -f $work/data/dataset.json ] || $E data synth --rows "$rows" --cardinality-cap 2000000 --out $work/data --no-progress
cp $work/data/dataset.json "$out/"
echo "data ready after $(( $(date +%s) - t0 )) s"
$E launch --nproc-per-node $nproc -- train --data $work/data --out $work/full "${S[@]}" > "$out/full.log" 2>&1
mkdir -p "$out/full" && cp $work/full/metrics.json "$out/full/"
echo "full done after $(( $(date +%s) - t0 )) s"
for m in $methods; do
  warm=(); [ "$m" = amtl ] && warm=(--set search.init_from=$work/full)  # AMTL warm-starts from the baseline
  $E run --data $work/data --method $m --budget 0.125 --nproc-per-node $nproc --out $work/$m "${S[@]}" "${warm[@]}" > "$out/$m.log" 2>&1
  mkdir -p "$out/$m/retrain"
  cp $work/$m/plan.json $work/$m/metrics.json $work/$m/run_state.json "$out/$m/" 2>/dev/null
  cp $work/$m/retrain/metrics.json "$out/$m/retrain/" 2>/dev/null
  echo "$m done after $(( $(date +%s) - t0 )) s"
done
python - "$out" $methods <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
full = json.loads((out / "full/metrics.json").read_text())
print(f"| run | test AUC | logloss | emb params | fraction | samples/s |\n|---|---|---|---|---|---|")
print(f"| full | {full['test_auc']:.4f} | {full['test_logloss']:.4f} | {full['embedding_params']:,} | 1 | {full['samples_per_s']:,.0f} |")
for m in sys.argv[2:]:
    p = out / m / "retrain/metrics.json"
    if not p.exists():
        print(f"| {m} | missing | | | | |"); continue
    r = json.loads(p.read_text()); s = r.get("samples_per_s")
    print(f"| {m} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} | {r['embedding_params']:,} | {r['embedding_fraction']:.4f} | {s or 0:,.0f} |")
PY
