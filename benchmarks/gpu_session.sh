#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool: 15 minutes of device time per task, at most
# 10 minutes a call, the machine's start included), prepared so that it fits:
#
#   full  (~8 min): throughput on the GPU against the peers, meta-batch 32; MAML 5-way 1-shot for
#                   240 s of training with validation every 500 iterations (time to the paper's
#                   98.7%); Reptile 5-way 1-shot for 90 s.
#   short (~4 min): the same throughput with fewer rounds, and MAML 5-way 1-shot for 100 s: for a
#                   retry with less device time left.
#
# Everything lands in $OUT (the device tool fetches it); copy it into results/ here and commit it
# with the hardware, the time and the commit, which every file records. Prepare here first:
#
#   echo /.gpu/ >> .git/info/exclude && mkdir -p .gpu
#   (cd ../shared/data/omniglot && tar cf - omniglot-py | gzip -1) > .gpu/omniglot-py.tar.gz  # ~7 MB
#   .venv/bin/python -m pip download --no-deps higher==0.2.1 -d .gpu
#   git rev-parse --short HEAD > .gpu/commit
#
# then run, with `carry: [".gpu"]`:  bash benchmarks/gpu_session.sh full   (or short)
#
# The GPU machine has Python 3.12 with torch and no network: the library runs from the tree
# (PYTHONPATH), higher from its wheel; learn2learn, which must be built with Cython, is not
# there, and throughput.py then reports ratios to the torch.func loop.
set -uo pipefail
MODE=${1:-full}
case "$MODE" in full|short) ;; *) echo "usage: $0 full|short (got '$MODE')" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
HERE=$(pwd)
PY=${PY:-python3}
export MMTL_COMMIT=$(cat .gpu/commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
SITE=/tmp/gpu-site
mkdir -p "$SITE"
ls .gpu/*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --target "$SITE" .gpu/*.whl
export PYTHONPATH="$SITE:$HERE${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .gpu/omniglot-py.tar.gz ]; then
  mkdir -p /tmp/omniglot && tar xzf .gpu/omniglot-py.tar.gz -C /tmp/omniglot
  export MMTL_DATA=/tmp/omniglot
fi
DEVICE=${DEVICE:-cuda}

{
  date -u
  echo "mode $MODE, commit $MMTL_COMMIT, device $DEVICE"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/session.txt"

step() {  # step SECONDS NAME COMMAND...: one bounded step; a failure or timeout does not stop the next
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/session.txt"
  tail -n 25 "$OUT/$name.txt"
}

if [ "$MODE" = full ]; then
  step 150 throughput-cuda $PY benchmarks/throughput.py --device "$DEVICE" --methods loop,vmap,compile,func,higher \
    --json "$OUT/throughput-cuda.json"
  step 330 maml-5w1s $PY benchmarks/reproduce_omniglot.py --presets maml-5w1s --time-budget 240 --val-every 500 \
    --val-tasks 600 --device "$DEVICE" --tf32 --out "$OUT/omniglot.json"
  step 130 reptile-5w1s $PY benchmarks/reproduce_omniglot.py --presets reptile-5w1s --time-budget 90 \
    --device "$DEVICE" --tf32 --out "$OUT/omniglot.json"
else
  step 100 throughput-cuda $PY benchmarks/throughput.py --device "$DEVICE" --methods loop,vmap,compile,func,higher \
    --repeats 2 --json "$OUT/throughput-cuda.json"
  step 160 maml-5w1s $PY benchmarks/reproduce_omniglot.py --presets maml-5w1s --time-budget 100 --val-every 500 \
    --val-tasks 600 --device "$DEVICE" --tf32 --out "$OUT/omniglot.json"
fi
date -u | tee -a "$OUT/session.txt"
