#!/usr/bin/env bash
# The lowest versions pyproject.toml declares (jax, jaxlib, optax, and the flax extra's
# flax and orbax-checkpoint) are installed exactly in a clean virtual environment, and
# the core tests run against them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pins="$("$PYTHON" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["flax"]:
  name, low = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
  print(f"{name}=={low}")
PY
)"
echo "lower bounds:" $pins
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet $pins pytest hypothesis "chex>=0.1.87" numpy
"$tmp/venv/bin/python" -m pip install --quiet --no-deps .
"$tmp/venv/bin/python" -m pip check
cd "$tmp"  # the installed package, not the source tree
"$tmp/venv/bin/python" -m pytest -q -p no:randomly -o addopts="-p no:cacheprovider" \
  --rootdir="$OLDPWD" -c "$OLDPWD/pyproject.toml" \
  "$OLDPWD"/tests/test_engine_contract.py "$OLDPWD"/tests/test_ema.py \
  "$OLDPWD"/tests/test_multi_ema.py "$OLDPWD"/tests/test_schedules.py \
  "$OLDPWD"/tests/test_swap.py "$OLDPWD"/tests/test_stochastic_rounding.py \
  "$OLDPWD"/tests/test_offload.py "$OLDPWD"/tests/test_teachers.py \
  "$OLDPWD"/tests/test_checkpoint.py "$OLDPWD"/tests/test_restore_checks.py
