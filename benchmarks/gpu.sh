#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md, in one run of under 8 minutes:
#
#   bash benchmarks/gpu.sh            # or: make gpu-bench
#
# Writes JSON and logs to $OUT (default benchmarks/results/gpu-<time>/). Needs
# a CUDA jaxlib (`pip install -U "jax[cuda12]"`) and the package's [dev] extra.
# PEAK_GBS is the card's memory bandwidth in GB/s (H200: 4800, H100 SXM:
# 3350, A100 80GB: 2039); the standalone update's goal is >= 85% of it.
#
# SMOKE=1 runs every step at tiny sizes on whatever JAX sees (no GPU needed):
# tests/test_models_benchmark.py does, so the script stays runnable unchanged.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
PEAK_GBS=${PEAK_GBS:-4800}
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv || true
  "$PYTHON" -c 'import jax; print(jax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/machine.txt"
SMOKE=${SMOKE:-}
if [ -n "$SMOKE" ]; then
  echo "SMOKE=1: tiny sizes, any backend; no figure of this run means anything." \
    | tee -a "$OUT/machine.txt"
  RUN_ARGS=(--smoke --sections ema,tree)
  MODEL_ARGS=(--smoke --frameworks linen)
  export OFFLOAD_N=${OFFLOAD_N:-1000}
elif ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  echo "JAX sees no GPU: install a CUDA jaxlib first." | tee -a "$OUT/machine.txt"
  exit 1
else
  RUN_ARGS=(--sizes 1e8,1e9 --rounds 7 --peak-gbs "$PEAK_GBS")
  MODEL_ARGS=(--rounds 7)
fi
status=0

# 1. The standalone update at 1e8 and 1e9 elements (float32; bfloat16 params
#    with a float32 average), one leaf and 200 leaves (one fused kernel?), as
#    a fraction of peak; the SGD/Adam steps with ema() against their one-pass
#    floor (1.67x for SGD: XLA:GPU has multi-output fusion), update_every=4,
#    and the CPU-only optimization barrier switched off (bfloat16 ablation).
timeout 330 "$PYTHON" benchmarks/run.py "${RUN_ARGS[@]}" --out "$OUT/run.json" \
  2>&1 | tee "$OUT/run.txt" || status=1

# 2. Host offload with real transfers: device bytes held and step time of a
#    donated SGD step, the average in device memory vs in pinned host memory.
timeout 90 "$PYTHON" - "$OUT/offload.json" <<'PY' 2>&1 | tee "$OUT/offload.txt"
import json, os, sys
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp, optax, ema_jax
from harness import Case, run_group, summary, threaded

N = int(float(os.environ.get("OFFLOAD_N", "1e8")))
params = jax.device_put({"w": jnp.ones((N,), jnp.float32)})
grads = jax.device_put({"w": jnp.full((N,), 1e-3, jnp.float32)})
cases, held = [], {}
for kind in (None, "pinned_host"):
  tx = optax.chain(optax.sgd(1e-3), ema_jax.ema(0.999, memory_kind=kind))

  def make(tx=tx, kind=kind):
    def step(carry, grads):
      p, s = carry
      u, s = tx.update(grads, s, p)
      return optax.apply_updates(p, u), s
    in_use = lambda: (jax.devices()[0].memory_stats() or {}).get("bytes_in_use", 0)
    before = in_use()
    state = jax.block_until_ready(tx.init(params))
    held[str(kind)] = in_use() - before  # the device bytes the EMA state holds
    return threaded(jax.jit(step, donate_argnums=0), (jax.tree.map(jnp.copy, params), state), grads)

  cases.append(Case(f"sgd + ema(memory_kind={kind!r})", make, 0.0))
run_group(cases, 7, 0.05)
report = {"n": N, "ema_state_device_bytes": held, "cases": [summary(c) for c in cases]}
for c in report["cases"]:
  print(c["name"], c.get("median_s"), c.get("skipped", ""))
print("device bytes the EMA state holds:", held)
json.dump(report, open(sys.argv[1], "w"), indent=1)
PY
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# 3. The real models (transformer LM, ResNet-style CNN; Linen, NNX, Keras).
timeout 150 "$PYTHON" benchmarks/models.py "${MODEL_ARGS[@]}" --out "$OUT/models.json" \
  2>&1 | tee "$OUT/models.txt" || status=1

echo "GPU results in $OUT (exit status $status: 1 if a step failed or timed out)"
exit $status
