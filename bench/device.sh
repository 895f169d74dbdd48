#!/usr/bin/env bash
# The accelerator benchmarks in one bounded run: bench/worker.py (wide, mlp, cnn) and
# bench/aggregate.py, each one's JSON into $OUT, then a short summary.
#
#   bash bench/device.sh                  # on a lent GPU/TPU machine, or here (CPU mode: a short smoke run)
#   bash bench/device.sh --fetch-wheels   # HERE, before: the wheels the device's Python lacks, into .whl/fedpipe-bench
#
# The device machine reaches no network, so everything travels with the tree. The project's
# own pins (jax 0.10.2 + jax[cuda12], requirements-gpu.txt) do NOT fit the 64 MiB a run may
# carry (jaxlib 0.10.2 alone is an 82 MiB wheel; the CUDA wheels are GBs), so this script
# uses the Python and JAX the machine already has (the H200 image: python3 3.12 with jax
# 0.11.2 for CUDA 13, numpy, optax, pyarrow, scipy) and says which it ran with. What that
# Python lacks for the worker path (tink, pydantic, google-auth, ...) travels as ~7.4 MiB of
# wheels made here by --fetch-wheels (carry .whl/fedpipe-bench), at the versions
# requirements-cpu.txt pins, installed into a private folder on PYTHONPATH for the worker
# runs only. Without them, or if they do not import, worker.py runs --bare-only (bare loop
# and MFU, no worker path) and the summary says so. Nothing else is ever installed.
#
# Environment:
#   OUT                     where the JSON goes (the device tool sets it); default results/device-<time>
#   PYTHON                  the interpreter; default: .venv/bin/python if it imports jax, else python3
#   FEDPIPE_DEVICE_MODE     auto (default: accelerator if jax's default backend is not the CPU) | cpu | accelerator
#   FEDPIPE_DEVICE_BUDGET_S total seconds for the benchmarks (default 420: 7 minutes); each step gets its
#                           share as a hard timeout, so the whole script ends within about this + 30 s
#   WHEEL_PYTHON_VERSION    --fetch-wheels: the device's Python (default 3.12, the H200 image's)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
WHEELS="$ROOT/.whl/fedpipe-bench"
# The worker path's imports the H200 image lacks (KINDS.md's package list), and what they need.
WHEEL_NAMES="tink bazel-runfiles protobuf pydantic pydantic-core annotated-types typing-inspection typing-extensions google-auth"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    pyver="${WHEEL_PYTHON_VERSION:-3.12}"
    lock="workers/trainer/requirements-cpu.txt"
    pins=()
    for name in $WHEEL_NAMES; do
        pin=$(grep -E "^${name}==" "$lock") || { echo "no pin for $name in $lock" >&2; exit 1; }
        pins+=("$pin")
    done
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/*.whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${pins[@]}" || exit 1
    echo "wheels for CPython $pyver in ${WHEELS#"$ROOT"/} ($(du -sh "$WHEELS" | cut -f1)); carry that folder with the run:"
    ls "$WHEELS"
    exit 0
fi

OUT="${OUT:-$ROOT/results/device-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
LOG="$OUT/bench.log"
export PYTHONUNBUFFERED=1
START=$(date +%s)
log() { echo "$*" | tee -a "$LOG"; }

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import jax' 2>/dev/null && PYTHON=.venv/bin/python
fi
log "== fedpipe device benchmarks, $(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$LOG"
fi
if ! "$PYTHON" -c 'import jax, numpy, optax' >>"$LOG" 2>&1; then
    log "ERROR: $PYTHON cannot import jax, numpy and optax; nothing can run, and nothing is installed that is"
    log "not carried (the machine has no network). Set PYTHON to an interpreter that has them."
    echo '{"error": "no jax/numpy/optax in '"$PYTHON"'"}' >"$OUT/summary.json"
    exit 2
fi
ENV_JSON=$("$PYTHON" -c '
import json, platform, jax, numpy
d = jax.devices()
print(json.dumps({"python": platform.python_version(), "executable": __import__("sys").executable, "jax": jax.__version__,
                  "numpy": numpy.__version__, "backend": jax.default_backend(), "device_kind": d[0].device_kind, "devices": len(d)}))')
log "python: $ENV_JSON"
BACKEND=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])["backend"])' "$ENV_JSON")
MODE="${FEDPIPE_DEVICE_MODE:-auto}"
[[ "$MODE" == auto ]] && { [[ "$BACKEND" == cpu ]] && MODE=cpu || MODE=accelerator; }
PINNED_JAX=$(sed -n 's/^jax==//p' workers/trainer/requirements-cpu.txt)
log "mode: $MODE (jax backend $BACKEND); the project pins jax $PINNED_JAX, this run uses the machine's"

# The worker path's imports: carried wheels go into a private folder, on PYTHONPATH for worker.py only.
WORKER_ENV=()
BARE_ONLY=()
probe='import pyarrow, tink, pydantic, google.auth, shared.envelope, shared.preprocess'
if ! "$PYTHON" -c "$probe" 2>/dev/null; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        site=/tmp/fedpipe-bench-site
        rm -rf "$site"
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl >>"$LOG" 2>&1; then
            WORKER_ENV=(env "PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}")
            log "installed the carried wheels into $site (for worker.py only): $(cd "$WHEELS" && echo *.whl)"
        else
            log "WARNING: the carried wheels did not install (see $LOG)"
        fi
    else
        log "no carried wheels in ${WHEELS#"$ROOT"/} (make them here with: bash bench/device.sh --fetch-wheels)"
    fi
    if ! "${WORKER_ENV[@]}" "$PYTHON" -c "$probe" >>"$LOG" 2>&1; then
        BARE_ONLY=(--bare-only)
        log "WARNING: the worker path cannot import here (see $LOG): worker.py runs --bare-only (bare loop and MFU only)"
    fi
fi

# Each step: a hard timeout (its share of the budget, never past the end of it), its output
# appended to the log, and its last line, if it is JSON, saved as $OUT/NAME.json.
BUDGET="${FEDPIPE_DEVICE_BUDGET_S:-420}"
STATUS=()
step() {
    local name=$1 share=$2; shift 2
    local now left cap rc
    now=$(date +%s)
    left=$((START + BUDGET - now))
    cap=$((BUDGET * share / 100))
    ((cap > left)) && cap=$left
    if ((cap < 10)); then
        STATUS+=("$name: skipped (budget spent)")
        log "== $name: skipped, the budget is spent"
        return
    fi
    log "== $name (at most ${cap}s): $*"
    timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.out" 2>>"$LOG"
    rc=$?
    cat "$OUT/$name.out" >>"$LOG"
    if tail -n 1 "$OUT/$name.out" | "$PYTHON" -c 'import json, sys; json.loads(sys.stdin.read())' 2>/dev/null; then
        tail -n 1 "$OUT/$name.out" >"$OUT/$name.json"
        STATUS+=("$name: ok")
    elif ((rc == 124 || rc == 137)); then
        STATUS+=("$name: TIMED OUT after ${cap}s")
    else
        STATUS+=("$name: FAILED (exit $rc)")
    fi
    rm -f "$OUT/$name.out"
    log "   $name: exit $rc after $(($(date +%s) - now))s"
}

if [[ "$MODE" == accelerator ]]; then
    step worker-wide 36 "${WORKER_ENV[@]}" "$PYTHON" bench/worker.py --model wide "${BARE_ONLY[@]}"
    step aggregate 36 "$PYTHON" bench/aggregate.py --cases small,large --no-robust
    step worker-mlp 14 "${WORKER_ENV[@]}" "$PYTHON" bench/worker.py --model mlp "${BARE_ONLY[@]}"
    step worker-cnn 14 "${WORKER_ENV[@]}" "$PYTHON" bench/worker.py --model cnn "${BARE_ONLY[@]}"
else  # CPU: a smoke run of the same steps, small enough for a couple of minutes on 2 cores
    step worker-wide 36 "${WORKER_ENV[@]}" "$PYTHON" bench/worker.py --model wide --samples 4096 --epochs 1 --repeats 1 "${BARE_ONLY[@]}"
    step aggregate 36 "$PYTHON" bench/aggregate.py --quick
    step worker-mlp 14 "${WORKER_ENV[@]}" "$PYTHON" bench/worker.py --model mlp --samples 8192 --epochs 2 --repeats 1 "${BARE_ONLY[@]}"
    step worker-cnn 14 "${WORKER_ENV[@]}" "$PYTHON" bench/worker.py --model cnn --samples 512 --epochs 1 --repeats 1 "${BARE_ONLY[@]}"
fi

# The summary: one line per result, and $OUT/summary.json with the environment and each step's status.
"$PYTHON" - "$OUT" "$MODE" "$ENV_JSON" "$(($(date +%s) - START))" "${STATUS[@]}" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path

out, mode, env, elapsed, status = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
res = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
fmt = lambda v, f: "null" if v is None else format(v, f)  # noqa: E731
print(f"== summary ({mode} mode, {elapsed}s): jax {env['jax']} on {env['device_kind']} x{env['devices']}, python {env['python']}")
for line in status:
    print(f"   {line}")
if mode == "cpu":
    print("   (CPU mode: a smoke run of one short repeat each; its ratios are not measurements)")
for name in ("worker-wide", "worker-mlp", "worker-cnn"):
    if (r := res.get(name)):
        worker = (f"worker {fmt(r['worker_samples_per_s'], ',.0f')} / " if r["worker_path"] == "ran" else "worker path skipped, ")
        print(f"{name}: {r['params']:,} params, batch {r['batch']}: {worker}bare {fmt(r['bare_samples_per_s'], ',.0f')} samples/s"
              + (f" = {fmt(r['ratio'], '.2f')} (target 0.70)" if r["ratio"] is not None else "")
              + f"; MFU bare {fmt(r['bare_mfu'], '.1%')}, worker {fmt(r['worker_mfu'], '.1%')} ({r['peak_basis']})")
if (r := res.get("aggregate")):
    print(f"aggregate (N={r['n']} x {r['p']:,}): hub {r['ours_gbps']} GB/s = {fmt(r['ours_vs_host_bw'], '.2f')} of the host's "
          f"{r['host_bw_gbps']} GB/s (target 0.80; {fmt(r['ours_vs_host_read_bw'], '.2f')} of its best read, {r['host_read_bw_gbps']} GB/s), "
          f"numpy {r['numpy_gbps']} GB/s"
          + (f"; on the device {fmt(r['device_agg_gbps'], ',.1f')} GB/s = {fmt(r['device_agg_vs_device_bw'], '.2f')} of "
             f"{fmt(r['device_bw_gbps'], ',.1f')} GB/s" if r["device_agg_gbps"] else "; no device aggregation (CPU backend)"))
summary = {"mode": mode, "elapsed_s": elapsed, "env": env, "status": status,
           "results": {k: {f: v.get(f) for f in ("ratio", "bare_mfu", "worker_mfu", "worker_samples_per_s", "bare_samples_per_s",
                                                 "ours_vs_host_bw", "ours_vs_host_read_bw", "device_agg_vs_device_bw",
                                                 "host_bw_gbps", "device_bw_gbps", "worker_path")
                           if f in v} for k, v in res.items()}}
(out / "summary.json").write_text(json.dumps(summary))
EOF
log "JSON in $OUT: $(cd "$OUT" && echo ./*.json)"
