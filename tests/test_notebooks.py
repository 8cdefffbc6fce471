"""The notebooks and the examples run from a clean checkout, so they never rot."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# posthoc.ipynb comes with the post-hoc EMA work; run it whenever it is there.
NAMES = [n for n in ("quickstart.ipynb", "posthoc.ipynb") if (NOTEBOOKS / n).exists()]


def _env():
  # The kernel and the demo import this checkout's ema_jax, installed or not.
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
  )
  return env


def test_quickstart_is_committed_without_outputs():
  nbformat = pytest.importorskip("nbformat")
  notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert code
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, (
        "Clear the outputs before committing: "
        "jupyter nbconvert --clear-output --inplace notebooks/quickstart.ipynb"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  for key, value in _env().items():
    monkeypatch.setenv(key, value)
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(
      notebook,
      timeout=300,
      kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOKS)}},
  )
  client.execute()  # raises CellExecutionError, with the cell, on any error
  text = "".join(
      output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
      for cell in notebook.cells
      if cell.cell_type == "code"
      for output in cell.outputs
  )
  if name == "quickstart.ipynb":
    assert "raw weights restored exactly: True" in text
    assert "training model is unchanged: True" in text
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2  # the decay schedule and the accuracy curves


def _run_example(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / name), *args],
      capture_output=True,
      text=True,
      timeout=300,
      env=_env(),
      cwd=cwd,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_demo_runs(tmp_path):
  out = tmp_path / "demo_output"
  result = _run_example("demo.py", "--epochs", "1", "--out", str(out),
                        cwd=tmp_path)
  lines = result.stdout.splitlines()
  header = lines.index(
      next(l for l in lines if l.split() == ["epoch", "raw", "acc", "EMA", "acc"])
  )
  table = [l.split() for l in lines[header + 1 : header + 2]]
  assert [row[0] for row in table] == ["1"]
  for row in table:
    assert all(0.0 <= float(v) <= 1.0 for v in row[1:])
  assert f"plot: {out / 'demo.png'}" in result.stdout
  assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (out / "ema_weights").is_dir()
  assert "training" in result.stderr  # the progress bar


def test_mean_teacher_smoke(tmp_path):
  out = tmp_path / "out"
  result = _run_example("mean_teacher.py", "--smoke", "--out", str(out),
                        cwd=tmp_path)
  lines = result.stdout.splitlines()
  header = lines.index(
      next(l for l in lines if l.split() == ["epoch", "student", "teacher"])
  )
  rows = [l.split() for l in lines[header + 1 : header + 3]]
  assert [row[0] for row in rows] == ["1", "2"]
  for row in rows:
    assert all(0.0 <= float(v) <= 1.0 for v in row[1:])
  # About 10% of the training labels are used, as many of every class.
  assert lines[0].startswith("labels of 125 of the 1257 training images used")
  assert any(l.startswith("epochs 2-2, mean test accuracy") for l in lines)
  assert f"plot: {out / 'mean_teacher.png'}" in result.stdout
  assert (out / "mean_teacher.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
