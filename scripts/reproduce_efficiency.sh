#!/usr/bin/env bash
# Reproduce the efficiency tables: every method's throughput and peak memory, 1K-16K tokens, on this machine's GPU
# (results/efficiency.{md,csv} and results/plots/). Each profile is configs/bench/<name>.yaml:
#   gpu         the headline: 2-layer harness encoder and the attention alone, 1K-16K, fp32/bf16/fp16, batch 1
#   lra-table2  LRA Table 2's condition: the LRA Text encoder, batch 32, 1K-4K, training steps/s
#
#   scripts/reproduce_efficiency.sh                       # PROFILES="gpu lra-table2"
#   PROFILES=quick BENCH_ARGS="--models nystromformer --lengths 1024" scripts/reproduce_efficiency.sh   # CPU, small
#
# Records go under $RESULTS_DIR/bench/<profile>/<device>/<run id>/ (never overwritten); a run with options that
# differ from its profile is filed as <profile>-custom and gets its own section; points that run out of memory are
# recorded as OOM. Time on one GPU: a `gpu` point took ~7.4 s on an H200 (a fresh process each), and `gpu` has 540
# points (18 models x 5 lengths x 2 modes x 3 precisions), about 67 minutes; `lra-table2` has 72 (18 models x 4
# lengths), about 10 minutes (estimated). BENCH_ARGS="--models ..." trims the grid.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || make install
RESULTS_DIR=${RESULTS_DIR:-results}
status=0
for profile in ${PROFILES:-gpu lra-table2}; do
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  "$PY" -m lra.bench --profile "$profile" --results-dir "$RESULTS_DIR" ${BENCH_ARGS:-} --no-plots || status=$?
done
"$PY" -m lra.bench --render-only --results-dir "$RESULTS_DIR" || status=$?
exit $status
