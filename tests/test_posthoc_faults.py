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


def start(directory: pathlib.Path, **extra: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  return subprocess.Popen(
      [sys.executable, str(WORKER), str(directory)], env=env, cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )


def run_until(directory, rng, steps, kill: bool, at=None, delay=None, **env) -> str:
  """Run the worker; with `kill`, SIGKILL it after step `at` plus `delay`
  seconds (by default a random step and delay)."""
  proc = start(directory, **env)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    first = proc.stdout.readline().split()
    assert first[:1] == ["start"], proc.communicate()[1][-3000:]
    resumed = int(first[1])
    if at is None:
      at = int(rng.integers(resumed + 1, steps + 1))
    for line in proc.stdout:
      assert time.monotonic() < deadline, "the worker hangs"
      if kill and line.split() == ["step", str(at)]:
        time.sleep(float(rng.uniform(0.0, 0.1)) if delay is None else delay)
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


def test_a_checkpoint_never_finishes_before_the_snapshots_it_follows(tmp_path):
  # Snapshot 40's write ends 3 s late; the checkpoint of step 42 is started
  # after it. Killed 1 s after step 42, the run must not leave checkpoint 42
  # on disk without snapshot 40: resumed from 42, it could never redo 40.
  # (Without `wait_until_finished` before the checkpoint, it did.)
  worker = load_worker()
  rng = np.random.default_rng(0)
  run_until(tmp_path, rng, worker.STEPS, kill=True, at=42, delay=1.0,
            EMA_JAX_SLOW_SNAPSHOT="40:3")
  checkpoints = steps_on_disk(tmp_path / "checkpoints")
  snapshots = steps_on_disk(worker.snapshot_dir(str(tmp_path)))
  # Every snapshot up to the checkpoint a resumed run starts from is there.
  assert set(range(5, checkpoints[-1] + 1, 5)) <= set(snapshots), (checkpoints, snapshots)
  run_until(tmp_path, rng, worker.STEPS, kill=False)
  assert steps_on_disk(worker.snapshot_dir(str(tmp_path))) == (*range(5, 41, 5), 43)
