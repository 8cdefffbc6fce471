"""benchmarks/models.py --smoke: it runs, and its JSON holds one record per
(model, framework, case) with the median and the ratio to the group's baseline.

No test asserts a time: the measured tables live in docs/benchmarks.md.
"""

from __future__ import annotations

import jax
from _util import run_smoke


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
  assert "ratio" in by_key[("cnn", "keras 3 (jax backend, train_on_batch)", "use_ema")]
  timm = by_key[("cnn", "timm", "ModelEmaV3")]
  assert "median_s" in timm or "skipped" in timm
  for case in ("hook (on_test_begin/end)", "context manager", "swap inside the jitted eval"):
    for framework in ("linen eval", "nnx eval"):
      assert by_key[("cnn", framework, case)]["baseline"] == "plain eval"
  round_trip = by_key[("cnn", "nnx eval", "round trip alone: ema_weights enter + exit")]
  assert round_trip["baseline"].startswith("floor") and round_trip["ratio"] > 0
