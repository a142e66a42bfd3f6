#!/usr/bin/env bash
# One GPU, one command, at most 8 minutes (issue #11): images/s of expert training, the mixture's
# inference with its experts in a loop, as one wide network and vmapped at batch 32 and 256, in
# float32 and under bfloat16 autocast, and the peak GPU memory of each (torch.cuda.max_memory_allocated),
# as markdown tables on stdout: benchmarks/throughput.py --device cuda, settings tiny (8 small_cnn
# experts, N = 200, 32 px) and lite0 (8 EfficientNet-Lite0 experts over cached trunk outputs).
#
#     bash benchmarks/gpu.sh            # from a checkout (or a copy of its working tree)
#
# Python: $PYTHON, else the first of runs/gpu-venv, .venv, python3, python whose torch sees a GPU.
# dmde: imported from src/ when its dependencies are there, else installed (pip install -e .) into
# runs/gpu-venv, a venv that reuses that Python's torch; with no torch anywhere, that venv gets
# torch from pip too. No CUDA GPU: one line, exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=470  # the whole command, setup included, under 8 minutes
VENV=runs/gpu-venv
SETTINGS=(tiny lite0)
IMPORTS="import dmde.fusion.mixture, dmde.fusion.batched, dmde.baselines.models, dmde.hierarchy.groups, dmde.core.training"

say() { echo "benchmarks/gpu.sh: $*" >&2; }
has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }
has_cuda() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

PY="" NOCUDA=""
for cand in "${PYTHON:-}" "$VENV/bin/python" .venv/bin/python python3 python; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && has_torch "$cand" || continue
    if has_cuda "$cand"; then PY=$cand; break; fi
    NOCUDA=${NOCUDA:-$cand}
done
if [ -z "$PY" ] && [ -z "$NOCUDA" ]; then  # a bare machine: torch from pip
    say "no Python with torch; installing dmde and torch into $VENV"
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q -e . || { say "pip install -e . failed (no network?)"; exit 1; }
    has_cuda "$VENV/bin/python" && PY=$VENV/bin/python || NOCUDA=$VENV/bin/python
fi
if [ -z "$PY" ]; then
    say "no CUDA GPU: torch $("$NOCUDA" -c 'import torch; print(torch.__version__)') in $NOCUDA sees none" \
        "($(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -1 || echo 'no nvidia-smi')); nothing measured"
    exit 1
fi

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1; then  # dmde's dependencies are missing: a venv on top of this torch
    say "$("$PY" -c "$IMPORTS" 2>&1 | tail -1); installing dmde into $VENV (reusing $PY's torch)"
    if [ "$PY" != "$VENV/bin/python" ]; then
        "$PY" -m venv --system-site-packages "$VENV" || { say "could not make $VENV"; exit 1; }
    fi
    "$VENV/bin/pip" install -q -e . || { say "pip install -e . failed (no network?)"; exit 1; }
    PY=$VENV/bin/python
    "$PY" -c "$IMPORTS" || { say "dmde still does not import with $PY"; exit 1; }
fi

LEFT=$((BUDGET_S - ($(date +%s) - START)))
[ "$LEFT" -ge 60 ] || { say "setup took $((BUDGET_S - LEFT)) s: no time left to measure"; exit 1; }
say "$PY, $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'); ${LEFT} s left"
status=0
timeout "$LEFT" "$PY" benchmarks/throughput.py --device cuda --precisions 32 bf16 --batches 32 256 \
    --settings "${SETTINGS[@]}" --threads 4 || status=$?
[ "$status" -ne 124 ] || say "stopped after ${LEFT} s (the 8-minute budget): the tables above are what finished"
say "$(($(date +%s) - START)) s in all"
exit "$status"
