#!/usr/bin/env bash
# The lowest versions pyproject.toml declares, installed exactly in clean virtual
# environments, each with the tests that cover it:
#   core: jax, jaxlib and optax at the `dependencies` floor (no Flax, no Orbax);
#   flax: the `flax` extra's floor (flax, orbax-checkpoint and the newer jax they
#         need), optax still at its floor; the Flax, Orbax and post-hoc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
src="$PWD"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# `name==low` for every `name>=low` of the dependencies; with an extra, its own
# floors replace the dependencies' (the flax extra raises jax's).
pins() {
  "$PYTHON" - "$@" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = project["dependencies"]
for extra in sys.argv[1:]:
  requirements += project["optional-dependencies"][extra]
low = {}
for requirement in requirements:
  name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
  low[name] = version
print(" ".join(f"{name}=={version}" for name, version in low.items()))
PY
}

# run_tests NAME PINS TEST_ARGS...: a venv with PINS, ema_jax from this tree, the tests.
run_tests() {
  local name="$1" pins="$2"
  shift 2
  echo "lower bounds ($name):" $pins
  "$PYTHON" -m venv "$tmp/$name"
  "$tmp/$name/bin/python" -m pip install --quiet $pins pytest hypothesis "chex>=0.1.87" numpy
  "$tmp/$name/bin/python" -m pip install --quiet --no-deps "$src"
  "$tmp/$name/bin/python" -m pip check
  (cd "$tmp" && "$tmp/$name/bin/python" -m pytest -q -rs -p no:randomly \
     -o addopts="-p no:cacheprovider" --rootdir="$src" -c "$src/pyproject.toml" \
     -m "not multiprocess" "$@")  # from $tmp: the installed package, not the source tree
}

# Memory kinds need jax 0.10.2 (ema_jax/_compat.py): at the core's floor those tests
# skip and test_memory_kind_refused_before_jax_0_10_2 checks the refusal.
t="$src/tests"
run_tests core "$(pins)" \
  "$t/test_engine_contract.py" "$t/test_ema.py" "$t/test_multi_ema.py" \
  "$t/test_schedules.py" "$t/test_swap.py" "$t/test_stochastic_rounding.py" \
  "$t/test_offload.py" "$t/test_teachers.py" "$t/test_presets.py" \
  "$t/test_properties.py" "$t/test_sharding.py"

run_tests flax "$(pins flax)" \
  "$t/test_flax_hook.py" "$t/test_checkpoint.py" "$t/test_restore_checks.py" \
  "$t/test_posthoc.py" "$t/test_ema.py" \
  "$t/test_engine_contract.py::test_partial_ema_flax_hook_round_trip_and_export"
