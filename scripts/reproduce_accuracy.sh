#!/usr/bin/env bash
# Reproduce an accuracy table: one run per task x model x seed under PROTOCOL, then results/accuracy.{md,csv,tex}.
#
#   scripts/reproduce_accuracy.sh PROTOCOL [TASKS] [MODELS] [SEEDS]
#   scripts/reproduce_accuracy.sh nystrom                                  # the Nyströmformer paper's Table 3 grid
#   scripts/reproduce_accuracy.sh nystrom listops nystromformer,proxyformer 0,1,2
#   ARGS="task.source=generate" scripts/reproduce_accuracy.sh nystrom listops   # ListOps made by the LRA generator
#
# It is `make sweep` (python -m lra.sweep: resume=true, so re-running continues where it stopped and skips finished
# cells) followed by `make tables`; a failed cell is recorded and shown in the tables, and the script then exits 1.
# ARGS: extra Hydra overrides for every cell. RESULTS_DIR: where records and tables go (default results).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || make install
PROTOCOL=${1:?usage: scripts/reproduce_accuracy.sh PROTOCOL [TASKS] [MODELS] [SEEDS]}
TASKS=${2:-listops,text,retrieval,image,pathfinder}
case "$PROTOCOL" in
  nystrom) DEFAULT_MODELS=transformer,nystromformer,proxyformer,cast,tost,performer,linformer,reformer ;;
  lra) DEFAULT_MODELS=transformer,nystromformer,proxyformer,cast,tost,local,sparse,longformer,linformer,reformer,sinkhorn,synthesizer,bigbird,linear,performer ;;
  *) DEFAULT_MODELS=transformer,nystromformer,proxyformer,cast,tost ;;
esac
MODELS=${3:-$DEFAULT_MODELS}
SEEDS=${4:-0,1,2}
RESULTS_DIR=${RESULTS_DIR:-results}
# shellcheck disable=SC2086  # ARGS is a list of overrides
"$PY" -m lra.sweep --tasks "$TASKS" --models "$MODELS" --seeds "$SEEDS" --protocol "$PROTOCOL" \
  paths.results_dir="$RESULTS_DIR" ${ARGS:-}
status=$?
"$PY" -m lra.tables --results-dir "$RESULTS_DIR" || exit $?
exit $status
