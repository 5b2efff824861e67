#!/usr/bin/env bash
# One GPU check of the 124M-shape work (docs/benchmarks.md, "GPU check"), from a fresh clone, in under 8 minutes on
# one GPU:
#   1. the 124M-shape benchmarks on the GPU: DPKD step vs TRL DPOTrainer (defaults and fastest configuration) and
#      the on-policy gkd step vs TRL GKDTrainer, with the DPKD fresh-step breakdown (`--quick`: fewer steps);
#   2. a bf16 DPKD run of the demo's distillation pipeline at 124M shape (bench/distill_124m.py, 20 steps);
#   3. the test suite with models on cuda (tests pick the GPU themselves), in the time left.
# Figures go to OUTDIR/results-gpu.json, logs and a summary (exit status and seconds of each part) beside it.
#
#   bash bench/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT/gpu-check, else ./gpu-check
#
# Environment:
#   GPU_PYTHON  a Python whose torch already sees the GPU (default python3): the venv sees its packages
#               (--system-site-packages), so torch is not installed again
#   TORCH       the torch requirement installed when GPU_PYTHON has no CUDA torch (default torch==2.13.0, whose
#               Linux wheel on PyPI is a CUDA build)
#   WHEELS      a folder of wheels to install from instead of a package registry (pip --no-index --find-links):
#               on a machine with internet, `pip download --dest wheels torch==2.13.0 ".[dev]"`
#   BUDGET_S    the whole check's time budget (default 480); the test suite gets what is left, at least 60 s
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUTDIR=${1:-${OUT:+$OUT/gpu-check}}
OUTDIR=${OUTDIR:-gpu-check}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
GPU_PYTHON=${GPU_PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
BUDGET_S=${BUDGET_S:-480}
VENV=.venv-gpu
PIP_ARGS=()
[ -n "${WHEELS:-}" ] && PIP_ARGS=(--no-index --find-links "$WHEELS")
SUMMARY="$OUTDIR/summary.tsv"
printf 'part\texit\tseconds\n' > "$SUMMARY"

part() {  # part NAME TIMEOUT_S COMMAND...: run, log to OUTDIR/NAME.log, record exit status and seconds
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$SUMMARY"
    tail -n 25 "$OUTDIR/$name.log"
    [ "$rc" = 124 ] && echo "$name: stopped at its time limit (${limit} s)"
    return 0
}

fail() { echo "gpu_check: $*" | tee "$OUTDIR/FAILED" >&2; exit 2; }

# ---- environment ------------------------------------------------------------------------------------------------
if "$GPU_PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    "$GPU_PYTHON" -m venv --system-site-packages "$VENV" || fail "cannot create $VENV with $GPU_PYTHON"
else
    "$GPU_PYTHON" -m venv "$VENV" || fail "cannot create $VENV with $GPU_PYTHON"
    "$VENV/bin/pip" install --quiet "${PIP_ARGS[@]}" "$TORCH" > "$OUTDIR/install-torch.log" 2>&1 \
        || fail "cannot install $TORCH (log: $OUTDIR/install-torch.log). Without a package registry, give WHEELS=DIR" \
                "with the wheels (pip download --dest DIR $TORCH \".[dev]\" where there is internet), or GPU_PYTHON=" \
                "a Python whose torch sees the GPU"
fi
"$VENV/bin/pip" install --quiet "${PIP_ARGS[@]}" -e ".[dev]" > "$OUTDIR/install-prefkd.log" 2>&1 \
    || fail "cannot install prefkd[dev] (log: $OUTDIR/install-prefkd.log). Without a package registry, give" \
            "WHEELS=DIR with its dependencies' wheels (pip download --dest DIR \".[dev]\")"
PY="$VENV/bin/python"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "torch in $VENV does not see a GPU: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    "$PY" -c "import torch, transformers, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'trl', trl.__version__); print(torch.cuda.get_device_name(0))"
    "$PY" -c "import liger_kernel" 2>/dev/null && echo "liger-kernel: installed" || echo "liger-kernel: not installed"
    git rev-parse HEAD 2>/dev/null
} > "$OUTDIR/environment.txt" 2>&1
cat "$OUTDIR/environment.txt"

# ---- the checks -------------------------------------------------------------------------------------------------
export BENCH_RESULTS="$OUTDIR/results-gpu.json" BENCH_DEVICE=cuda BENCH_THREADS=0 TRL_EXPERIMENTAL_SILENCE=1
part bench_124m 300 "$PY" -m bench.run --quick --shape 124m --device cuda --only dpkd_vs_trl_124m onpolicy_vs_trl_gkd
part distill_bf16_124m 150 "$PY" -m bench.distill_124m --shape 124m --steps 20
LEFT=$(( BUDGET_S - ($(date +%s) - START) - 15 ))
[ "$LEFT" -lt 60 ] && LEFT=60
part pytest_cuda "$LEFT" "$PY" -m pytest -q -m "not real_data" -p no:cacheprovider

echo "== summary (exit 124: stopped at its time limit)"
cat "$SUMMARY"
echo "total $(( $(date +%s) - START )) s; figures in $BENCH_RESULTS"
