"""benchmarks/precision.py --smoke: its JSON records, and the tables it prints from them."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "precision.py")
HALF_ULP = 2.0**-24


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("precision") / "p.json"
  result = subprocess.run(
      [sys.executable, SCRIPT, "--smoke", "--out", str(out)],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  with open(out) as f:
    return json.load(f), result.stdout


def tables(stdout: str) -> dict[str, list[list[str]]]:
  """`## title` -> the rows (header first) of the table under it."""
  found: dict[str, list[list[str]]] = {}
  title = None
  for line in stdout.splitlines():
    if line.startswith("## "):
      title = line[3:].strip()
    elif line.startswith("|") and title is not None:
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if not all(set(c) <= {"-"} for c in cells):
        found.setdefault(title, []).append(cells)
  return found


def section(found: dict[str, list[list[str]]], prefix: str) -> list[list[str]]:
  (rows,) = [rows for title, rows in found.items() if title.startswith(prefix)]
  return rows


def check_error_cell(text: str, rec: dict) -> None:
  """Worst |ratio - 1| rounded up to 2 significant digits, then `sN%` with the
  share of elements that never moved rounded up to a whole percent."""
  match = re.fullmatch(r"(\S+)(?: s(\d+)%)?", text)
  assert match, text
  shown, err = float(match.group(1)), rec["error_max"]
  assert shown >= err, (text, rec)
  if err > 0:
    assert shown - err <= 10.0 ** (math.floor(math.log10(err)) - 1) * (1 + 1e-9), (text, rec)
  else:
    assert shown == 0
  if rec["stalled_fraction"] > 0:
    assert match.group(2) is not None and int(match.group(2)) == math.ceil(
        rec["stalled_fraction"] * 100 - 1e-9), (text, rec)
  else:
    assert match.group(2) is None, (text, rec)


def test_records_cover_the_smoke_grid(run):
  data, _ = run
  cfg = data["config"]
  assert cfg["smoke"] and cfg["targets"] == ["fixed", "noisy"]
  keys = [(r["w"], r["gap"], r["target"], r["storage"]) for r in data["records"]]
  assert len(keys) == len(set(keys))
  for w in cfg["weights"]:
    ks = sorted({r["update_every"] for r in data["records"] if r["w"] == w} - {1})
    assert ks and set(ks) <= set(cfg["every"])  # every w has some update_every rows
    storages = ["float32", "float64"] + [f"float32 every {k}" for k in ks]
    for gap in cfg["gaps"]:
      for target in cfg["targets"]:
        for storage in storages:
          assert (w, gap, target, storage) in keys
  n_storages = sum(2 + len({r["update_every"] for r in data["records"] if r["w"] == w} - {1})
                   for w in cfg["weights"])
  assert len(keys) == n_storages * len(cfg["gaps"]) * 2
  assert [(r["w"], r["x"]) for r in data["threshold_scan"]] == [
      (w, x) for w in cfg["weights"] for x in cfg["scan"]]
  for key in ("processor", "cpu_count", "jax"):
    assert key in data["machine"]


def test_measurements_agree_with_the_half_ulp_rule(run):
  data, _ = run
  for r in data["records"]:
    w_k = -math.expm1(r["update_every"] * math.log1p(-r["w"]))
    if r["storage"] == "float64":
      assert r["error_max"] < 1e-6 and r["stalled_fraction"] == 0
    elif r["target"] == "fixed":
      assert r["prediction_disagreements"] == 0
      if r["gap"] * (1 + 1e-6) < HALF_ULP / 2 / w_k:  # every increment is lost
        assert r["stalled_fraction"] == 1
      if r["gap"] > 10 * HALF_ULP / w_k:
        assert r["stalled_fraction"] == 0 and r["error_max"] < 0.1
  assert all(r["disagreements"] == 0 for r in data["threshold_scan"])
  assert all(c["reference_vs_closed_form_error_max"] < 1e-12 for c in data["checks"])


def test_tables_match_the_records(run):
  data, stdout = run
  cfg = data["config"]
  found = tables(stdout)
  by = {(r["w"], r["gap"], r["target"], r["storage"]): r for r in data["records"]}

  for prefix, storage in (("float32 average (", "float32"), ("float64 average", "float64")):
    header, *rows = section(found, prefix)
    gaps = [float(h.removeprefix("gap ")) for h in header[2:]]
    assert gaps == list(cfg["gaps"])
    assert [(float(r[0]), r[1]) for r in rows] == [
        (w, t) for w in cfg["weights"] for t in cfg["targets"]]
    for row in rows:
      for gap, cell in zip(gaps, row[2:]):
        check_error_cell(cell, by[(float(row[0]), gap, row[1], storage)])

  header, *rows = section(found, "float32 average with update_every")
  every = sorted((r["w"], r["update_every"]) for r in data["records"] if r["update_every"] > 1)
  assert sorted((float(r[0]), int(r[1])) for r in rows) == sorted(set(every))
  for row in rows:
    w, k = float(row[0]), int(row[1])
    for gap, cell in zip(cfg["gaps"], row[2:]):
      fixed, noisy = cell.split(" / ")
      check_error_cell(fixed, by[(w, gap, "fixed", f"float32 every {k}")])
      check_error_cell(noisy, by[(w, gap, "noisy", f"float32 every {k}")])

  header, *rows = section(found, "Threshold scan")
  assert [float(h.removeprefix("x ")) for h in header[1:]] == list(cfg["scan"])
  scan = {(r["w"], r["x"]): r for r in data["threshold_scan"]}
  for row in rows:
    for x, cell in zip(cfg["scan"], row[1:]):
      match = re.fullmatch(r"(\S+) \((\S+)\)", cell)
      assert match, cell
      measured, formula = match.groups()
      rec = scan[(float(row[0]), x)]
      assert abs(float(measured) - rec["lost_measured"]) <= 5e-4
      assert abs(float(formula) - rec["lost_formula"]) <= 5e-4
      assert abs(rec["lost_formula"] - min(max(1 / x - 1, 0), 1)) < 1e-12

  header, *rows = section(found, "Theory")
  steps = {c["w"]: c["steps"] for c in data["checks"]}
  assert [float(r[0]) for r in rows] == list(cfg["weights"])
  for row in rows:
    w = float(row[0])
    assert row[2].startswith(f"{steps[w]} (")
    lo, hi = (float(v) for v in row[3].split(" .. "))
    assert math.isclose(lo, HALF_ULP / 2 / w, rel_tol=5e-3)
    assert math.isclose(hi, HALF_ULP / w, rel_tol=5e-3)

  header, *rows = section(found, "Smallest update_every")
  for row in rows:
    w = float(row[0])
    for gap, cell in zip(cfg["gaps"], row[1:]):
      k = int(cell)
      assert -math.expm1(k * math.log1p(-w)) >= HALF_ULP / gap
      assert k == 1 or -math.expm1((k - 1) * math.log1p(-w)) < HALF_ULP / gap

  checks = "\n".join(r for r in stdout.splitlines() if r.startswith("- "))
  n = sum(r["elements"] for r in data["threshold_scan"])
  bad = sum(r["disagreements"] for r in data["threshold_scan"])
  assert f"threshold scan {n - bad} of {n} elements agree" in checks
