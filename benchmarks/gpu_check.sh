#!/usr/bin/env bash
# The GPU check (issues 22 and 23 item 8): run it on a lent GPU machine, from the repository root.
#
#   bash benchmarks/gpu_check.sh            # about 3-5 minutes on one GPU
#
# Checks, one summary line each ("gpu_check: <check>: PASS|FAIL|SKIP ..."), logs under $OUT_DIR:
#   wsol        the torch (CUDA) WSOL box-metric engine against the CPU one: identical tables, speed ratio
#   sweep       a 2-trial `weakbench sweep search_spaces/cam.yaml --gpu` of CAM on the synthetic default
#   fractional  a 2-trial sweep with --gpus-per-trial 0.5 (both trials on one GPU, inline)
#   ddp         a 1-trial 2-worker DDP sweep (--gpu --num-workers 2) when two GPUs are visible
#   throughput  benchmarks/throughput.py (input pipeline, bare forward+backward, engine epoch; GPU wait share)
#
# On a machine without a GPU every step still runs its code path: the WSOL engine compares the
# torch engine on the CPU, the sweeps must be refused in one line with exit 2 (PASS when they are),
# DDP is skipped, and the throughput benchmark runs on the CPU. GPU_CHECK_QUICK=1 shrinks every
# step (CI: tests/test_gpu_check.py). Environment: PYTHON (default: python), OUT_DIR (default: a
# temporary directory).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-$(mktemp -d -t wb-gpu-check-XXXX)}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
QUICK=${GPU_CHECK_QUICK:-0}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
FAILED=0
T0=$SECONDS
line() { echo "gpu_check: $*"; }

echo "gpu_check: $NGPU GPU(s) visible; logs in $OUT_DIR"

# 1. WSOL metrics: CUDA engine vs CPU engine
if [ "$NGPU" -gt 0 ]; then MAPS=256; else MAPS=2; fi
if out=$($PY benchmarks/gpu_check_wsol.py --maps "$MAPS" 2>"$OUT_DIR/wsol.log"); then
  line "wsol: PASS $out"
else
  line "wsol: FAIL ${out:-see $OUT_DIR/wsol.log}"; FAILED=1
fi

# 2-4. sweeps on the synthetic default (1 epoch each); without a GPU each must be refused (exit 2, one line)
sweep_check() {  # name, min GPUs, extra flags...
  local name=$1 need=$2; shift 2
  if [ "$NGPU" -lt "$need" ] && [ "$NGPU" -gt 0 ]; then
    line "$name: SKIP needs $need GPUs, $NGPU visible"; return
  fi
  local t=$SECONDS
  $PY -m weakbench sweep search_spaces/cam.yaml "$@" --set epochs=1 --no-baselines --no-model --address local \
      -o "$OUT_DIR/$name" >"$OUT_DIR/$name.out" 2>"$OUT_DIR/$name.err"
  local rc=$?
  if [ "$NGPU" -eq 0 ]; then
    local msg; msg=$(grep -v '^\s*$' "$OUT_DIR/$name.err")
    if [ "$rc" -eq 2 ] && [ "$(printf '%s\n' "$msg" | wc -l)" -eq 1 ] && printf '%s' "$msg" | grep -q "no GPU is visible"; then
      line "$name: PASS (no GPU: refused, exit 2) $msg"
    else
      line "$name: FAIL without a GPU expected exit 2 and one line, got exit $rc: $(tail -c 300 "$OUT_DIR/$name.err")"; FAILED=1
    fi
  elif [ "$rc" -eq 0 ]; then
    line "$name: PASS in $((SECONDS - t)) s: $(grep -m1 -i "finished" "$OUT_DIR/$name.out" | tr -s ' ' | head -c 200)"
  else
    line "$name: FAIL exit $rc after $((SECONDS - t)) s: $(tail -c 300 "$OUT_DIR/$name.err")"; FAILED=1
  fi
}
if [ "$QUICK" = 1 ] && [ "$NGPU" -gt 0 ]; then TRIALS=1; else TRIALS=2; fi
sweep_check sweep 1 --gpu --trials "$TRIALS"
sweep_check fractional 1 --gpus-per-trial 0.5 --trials 2
if [ "$NGPU" -ge 2 ]; then
  sweep_check ddp 2 --gpu --num-workers 2 --trials 1
else
  line "ddp: SKIP a 2-worker DDP trial needs 2 GPUs, $NGPU visible"
fi

# 5. throughput: input pipeline, bare forward+backward, engine epoch (GPU images/s and wait share on a GPU)
DATA=${GPU_CHECK_DATA:-}
if [ -z "$DATA" ]; then  # the shared data beside a checkout (../shared) or beside a worktree folder (../../shared)
  for d in ../shared/data/ilsvrc_val1300/metadata ../../shared/data/ilsvrc_val1300/metadata; do
    [ -d "$d" ] && DATA=$d && break
  done
fi
if [ "$QUICK" = 1 ]; then TP_ARGS="--images 8 --size 32 --batch 4 --epochs 2 --workers 0"; else TP_ARGS="--images 256 --size 224 --batch 32 --epochs 3"; fi
if [ -z "$DATA" ] || [ ! -d "$DATA" ]; then
  line "throughput: SKIP no ILSVRC metadata folder found${DATA:+ at $DATA} (set GPU_CHECK_DATA)"
# shellcheck disable=SC2086
elif $PY benchmarks/throughput.py --data "$DATA" $TP_ARGS --json "$OUT_DIR/throughput.json" >"$OUT_DIR/throughput.log" 2>&1; then
  line "throughput: PASS $($PY -c "
import json, sys
r = json.load(open(sys.argv[1]))
e = r['engine']['default loader workers']
x = e['engine_over_mean_bare']
w = f', GPU waited for data ~{max(0.0, 1 - 1 / x):.0%} of the epoch' if r['device'].startswith('cuda') else ''
print(f\"{r['device']}: engine epoch {e['images_per_s']:.1f} img/s with {e['loader_workers']} loader worker(s), engine/bare {x:.2f}x{w}\")
" "$OUT_DIR/throughput.json")"
else
  line "throughput: FAIL $(tail -c 300 "$OUT_DIR/throughput.log")"; FAILED=1
fi

line "done in $((SECONDS - T0)) s, $([ $FAILED = 0 ] && echo 'all checks passed or skipped' || echo 'SOME CHECKS FAILED')"
exit $FAILED
