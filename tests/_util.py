"""Helpers shared by the tests: bitwise tree comparison, leaf predicates, and
running a benchmark script in smoke mode."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Pair(NamedTuple):
  a: Any
  b: Any


def is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and not is_key(x) and jnp.issubdtype(x.dtype, jnp.floating)


def leaves(tree: Any) -> list[Any]:
  # None kept as a leaf: the EMA holds None where the mask excludes a leaf.
  return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: x is None)


def bits(x: Any) -> tuple[bytes, Any, tuple[int, ...]]:
  x = jnp.asarray(x)
  if is_key(x):
    x = jax.random.key_data(x)
  return np.asarray(x).tobytes(), x.dtype, x.shape


def assert_bitwise_equal(x: Any, y: Any) -> None:
  """Same structure (None leaves included), dtypes, shapes and bytes (-0.0, NaN payloads)."""
  flat_x, def_x = jax.tree_util.tree_flatten(x, is_leaf=lambda v: v is None)
  flat_y, def_y = jax.tree_util.tree_flatten(y, is_leaf=lambda v: v is None)
  assert def_x == def_y
  for a, b in zip(flat_x, flat_y):
    if a is None or b is None:
      assert a is None and b is None
      continue
    assert bits(a) == bits(b)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_smoke(script: str, out: pathlib.Path, timeout: int = 600) -> tuple[dict[str, Any], str]:
  """Run `benchmarks/<script> --smoke --out <out>` as `make` does (no
  XLA_FLAGS); the JSON report it wrote and its stdout."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert f"JSON written to {out}" in result.stdout
  return json.loads(out.read_text()), result.stdout
