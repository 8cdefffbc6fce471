"""Post-hoc snapshots survive SIGKILL: a process killed at random points while
it writes snapshots (asynchronously) and checkpoints leaves only complete
snapshots, which synthesize bit for bit as an uninterrupted run's; resumed
from its latest checkpoint, it ends with exactly the uninterrupted run's
snapshots.

The kill points come from a seed drawn per run and shown on failure; set
EMA_JAX_FAULT_SEED to replay one.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time

import numpy as np

from ema_jax import posthoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_posthoc_fault_worker.py"
KILLS = 2  # then a run to the end: three worker starts, about 5 s each
TIMEOUT_S = 60  # one worker run; each takes a few seconds


def load_worker():
  spec = importlib.util.spec_from_file_location("_posthoc_fault_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def start(directory: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  return subprocess.Popen(
      [sys.executable, str(WORKER), str(directory)], env=env, cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )


def run_until(directory, rng, steps, kill: bool) -> str:
  """Run the worker; with `kill`, SIGKILL it at a random step plus a random delay."""
  proc = start(directory)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    first = proc.stdout.readline().split()
    assert first[:1] == ["start"], proc.communicate()[1][-3000:]
    resumed = int(first[1])
    at = int(rng.integers(resumed + 1, steps + 1))
    for line in proc.stdout:
      assert time.monotonic() < deadline, "the worker hangs"
      if kill and line.split() == ["step", str(at)]:
        time.sleep(float(rng.uniform(0.0, 0.1)))
        os.kill(proc.pid, signal.SIGKILL)
        break
    proc.wait(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  err = proc.stderr.read()
  if kill:
    assert proc.returncode in (-signal.SIGKILL, 0), err[-3000:]
  else:
    assert proc.returncode == 0, err[-3000:]
  return f"resumed at {resumed}, killed after step {at}"


def steps_on_disk(directory) -> tuple[int, ...]:
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(directory) as manager:
    return tuple(sorted(manager.all_steps()))


def synthesized(directory, step=None):
  return {
      sigma: np.asarray(posthoc.synthesize(directory, sigma, step=step)["w"])
      for sigma in (0.05, 0.10, 0.17)
  }


def test_killed_snapshot_writers_resume_bit_exact(tmp_path):
  worker = load_worker()
  seed = int(os.environ.get("EMA_JAX_FAULT_SEED", secrets.randbelow(2**31)))
  rng = np.random.default_rng(seed)
  reference = tmp_path / "reference"
  worker.run(str(reference))
  ref_dir = worker.snapshot_dir(str(reference))
  ref_steps = steps_on_disk(ref_dir)
  assert ref_steps == (*range(5, 41, 5), 43)

  run = tmp_path / "killed"
  history = [f"seed {seed}"]
  for _ in range(KILLS):
    history.append(run_until(run, rng, worker.STEPS, kill=True))
    where = "; ".join(history)
    if not os.path.isdir(worker.snapshot_dir(str(run))):
      continue
    steps = steps_on_disk(worker.snapshot_dir(str(run)))
    if not steps:
      continue
    # Only complete snapshots are seen, and they are the reference's, in order.
    assert steps == tuple(s for s in ref_steps if s <= steps[-1]), where
    got = synthesized(worker.snapshot_dir(str(run)))
    want = synthesized(ref_dir, step=steps[-1])
    for sigma in got:
      np.testing.assert_array_equal(got[sigma], want[sigma], err_msg=f"{sigma}; {where}")
  history.append(run_until(run, rng, worker.STEPS, kill=False))
  where = "; ".join(history)
  assert steps_on_disk(worker.snapshot_dir(str(run))) == ref_steps, where
  got, want = synthesized(worker.snapshot_dir(str(run))), synthesized(ref_dir)
  for sigma in got:
    np.testing.assert_array_equal(got[sigma], want[sigma], err_msg=f"{sigma}; {where}")
