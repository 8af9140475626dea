#!/usr/bin/env bash
# The first thing to run on a GPU (about 10 minutes on one H100): does the suite work there, and what does it measure?
#   1. the CUDA-only tests (pytest -m cuda): mixed-precision training of the four methods, SDPA reaching a fused
#      kernel (FlashAttention or cuDNN's);
#   2. the 4096-token benchmark points of softmax, sdpa and the four methods (profile gpu, training, fp32 and fp16);
#   3. a 300-step `nystrom` ListOps run of each of the four methods (LRA-generated ListOps, 10k training examples).
# Everything writes the suite's normal records, so `make tables` and the efficiency tables include them.
#   scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || make install
RESULTS_DIR=${RESULTS_DIR:-results}
status=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine with a CUDA build of torch (make install TORCH=... TORCH_INDEX=...)')" || exit 2
"$PY" -c "import torch; print('[gpu_check]', torch.cuda.get_device_name(), 'torch', torch.__version__)"
"$PY" -m pytest -q -m cuda tests/ || status=$?
"$PY" -m lra.bench --profile gpu --models nystromformer proxyformer cast tost --lengths 4096 --modes train \
  --precisions fp32 fp16 --repeats 5 --results-dir "$RESULTS_DIR" || status=$?
"$PY" -m lra.sweep --tasks listops --models nystromformer,proxyformer,cast,tost --seeds 0 --protocol nystrom \
  task.source=generate task.generator.num_train=10000 trainer.max_steps=300 trainer.val_check_interval=100 \
  paths.results_dir="$RESULTS_DIR" || status=$?
"$PY" -m lra.tables --results-dir "$RESULTS_DIR" || status=$?
exit $status
