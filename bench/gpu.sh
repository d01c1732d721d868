#!/usr/bin/env bash
# Everything only a GPU can show, in one call (run from the repository root on a machine with CUDA):
#   1. the GPU-marked tests;
#   2. bench/model.py on CUDA (bf16 encoder throughput and model FLOP utilisation of every architecture);
#   3. bench/train.py's CUDA figures (og-clip-vit-l-14 bf16 train step against the FLOP-bound limit);
#   4. the GPU demo (infra/configs/demo-gpu.yaml: og-clip-small on ~1M fresh renders), wall time included.
# Each part prints its own figures; the logs also go to $OUT (or outputs/gpu) for keeping.
#     bash bench/gpu.sh [tests|model|train|demo|all]     (default: all, in that order)
set -uo pipefail
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LOGS=${OUT:-outputs/gpu}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device")' || exit 1
"$PY" -c 'import ogclip, ogclip_jobs' 2>/dev/null || "$PY" -m pip install --quiet --no-deps -e . || exit 1

part() {
  echo "== $1 ($(date -u +%H:%M:%S))"
  local start=$SECONDS
  shift
  "$@" 2>&1 | tee -a "$LOGS/gpu.log"
  local rc=${PIPESTATUS[0]}
  echo "== done in $((SECONDS - start)) s, exit $rc"
  return "$rc"
}

what=${1:-all}
status=0
case $what in tests|all) part tests "$PY" -m pytest -m gpu -q -p no:cacheprovider || status=1 ;; esac
case $what in model|all) part model "$PY" bench/model.py --device cuda --json "$LOGS/model.json" || status=1 ;; esac
case $what in train|all) part train "$PY" bench/train.py --steps 20 || status=1 ;; esac
case $what in demo|all)
  part demo "$PY" -m ogclip_jobs.cli demo --config infra/configs/demo-gpu.yaml || status=1
  cp outputs/demo-gpu/demo.json "$LOGS/demo-gpu.json" 2>/dev/null ;;
esac
exit $status
