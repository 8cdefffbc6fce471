#!/usr/bin/env bash
# The built wheel: holds py.typed and the license, installs (not editable) into a
# clean virtual environment with its dependencies from PyPI, and imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip wheel --quiet --no-deps -w "$tmp/dist" .
wheel="$(ls "$tmp"/dist/ema_jax-*.whl)"
"$PYTHON" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for needed in ("ema_jax/py.typed", "ema_jax/flax/__init__.py", "ema_jax/posthoc.py"):
  assert needed in names, f"{needed} is not in the wheel"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no LICENSE in the wheel"
assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names), names
print(f"wheel: {len(names)} files, py.typed and LICENSE included")
PY
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet "$wheel[flax]"
cd "$tmp"  # not the source tree: the installed package must be the one imported
"$tmp/venv/bin/python" - <<'PY'
import ema_jax, ema_jax.flax, ema_jax.posthoc
assert "site-packages" in ema_jax.__file__, ema_jax.__file__
print(f"installed wheel imports: ema_jax {ema_jax.__version__} from {ema_jax.__file__}")
PY
