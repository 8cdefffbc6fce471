"""benchmarks/models.py --smoke: it runs, and its JSON holds one record per
(model, framework, case) with the median and the ratio to the group's baseline.

No test asserts a time: the measured tables live in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
from _util import ROOT, run_smoke


def test_models_benchmark_smoke_mode_runs(tmp_path):
  report, _ = run_smoke("models.py", tmp_path / "models.json")
  assert report["mode"] == "smoke" and report["versions"]["jax"] == jax.__version__
  assert len(report["machine"]["load_average_at_start"]) == 3
  records = report["records"]
  keys = [(r["model"], r["framework"], r["case"]) for r in records]
  assert len(keys) == len(set(keys))  # one record per (model, framework, case)
  by_key = {k: r for k, r in zip(keys, records)}
  linen = "linen (jax.jit, donated)"
  for framework in (linen, "nnx.jit"):
    for case in ("no EMA", "ema()", "ema(update_every=4)", "average_stats"):
      r = by_key[("cnn", framework, case)]
      assert r["median_s"] > 0 and r["p25_s"] <= r["median_s"] <= r["p75_s"]
      assert r["baseline"] == "no EMA" and r["ratio"] > 0 and r["dispatch_s"] > 0
    assert by_key[("cnn", framework, "no EMA")]["ratio"] == 1.0
  assert "ratio" in by_key[("cnn", "nnx.jit", "nnx.EMA")]
  reference = by_key[("cnn", "nnx.jit", "optax.ema() (reference: a state of the same size)")]
  assert reference["ratio"] > 0 and reference["dispatch_s"] > 0
  assert "ratio" in by_key[("cnn", "keras 3 (jax backend, train_on_batch)", "use_ema")]
  timm = by_key[("cnn", "timm", "ModelEmaV3")]
  assert "median_s" in timm or "skipped" in timm
  for case in ("hook (on_test_begin/end)", "context manager", "swap inside the jitted eval"):
    for framework in ("linen eval", "nnx eval"):
      assert by_key[("cnn", framework, case)]["baseline"] == "plain eval"
  round_trip = by_key[("cnn", "nnx eval", "round trip alone: ema_weights enter + exit")]
  assert round_trip["baseline"].startswith("floor") and round_trip["ratio"] > 0


def test_gpu_script_runs_every_step_in_smoke_mode(tmp_path):
  # benchmarks/gpu.sh is for a GPU machine this project may not have: SMOKE=1
  # runs each of its steps at tiny sizes here, so it stays runnable unchanged.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(SMOKE="1", PYTHON=sys.executable, OUT=str(tmp_path))
  result = subprocess.run(
      ["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "exit status 0" in result.stdout
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["ema"] and run["tree"] and run["tree"][0]["paired"]
  offload = json.loads((tmp_path / "offload.json").read_text())
  assert [c["name"] for c in offload["cases"] if "median_s" in c] == [
      "sgd + ema(memory_kind=None)", "sgd + ema(memory_kind='pinned_host')"]
  assert json.loads((tmp_path / "models.json").read_text())["records"]
