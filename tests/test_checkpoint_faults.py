"""A process killed (SIGKILL) at random points while saving checkpoints loses nothing.

The worker (tests/_checkpoint_fault_worker.py) trains and saves after every
step with Orbax's asynchronous saves; it is killed at a random point, possibly
mid-save. Restoring the latest complete checkpoint, resuming (another process)
and training to the end must give, bit for bit, the uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import ema_jax.flax
from _util import assert_bitwise_equal

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_checkpoint_fault_worker.py"
STEPS = 8
TIMEOUT_S = 60


def load_worker():
  spec = importlib.util.spec_from_file_location("_checkpoint_fault_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def start(directory):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  # Compiling the step is most of a worker's start: the resumed ones reuse it.
  env["JAX_COMPILATION_CACHE_DIR"] = str(pathlib.Path(directory).parent / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return subprocess.Popen(
      [sys.executable, str(WORKER), str(pathlib.Path(directory) / "ckpt"), str(STEPS)],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
  )


def kill_while_saving(directory, at_step, delay_s):
  """Run the worker; SIGKILL it `delay_s` after it starts saving `at_step`."""
  proc = start(directory)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for line in proc.stdout:
      if line.strip() == f"saving {at_step}":
        time.sleep(delay_s)
        break
      assert time.monotonic() < deadline, "worker too slow"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL  # it was killed, not finished


def restore_latest(directory, worker):
  with ocp.CheckpointManager(pathlib.Path(directory) / "ckpt") as manager:
    step = manager.latest_step()
    return step, ema_jax.flax.restore_checkpoint(manager, worker.initial_state())


def assert_same_run(a, b):
  assert_bitwise_equal((a.step, a.params, a.opt_state), (b.step, b.params, b.opt_state))


@pytest.mark.standard_promotion  # optax is not strict-clean
def test_killed_while_saving_resumes_bitwise(tmp_path):
  worker = load_worker()
  uninterrupted = [worker.initial_state()]
  for _ in range(STEPS):
    uninterrupted.append(worker.train_step(uninterrupted[-1]))

  rng = np.random.default_rng(0)
  latest = 0
  for _ in range(2):  # killed twice, each time resumed by a new process
    at_step = int(rng.integers(latest + 2, latest + 4))
    kill_while_saving(tmp_path, at_step, float(rng.uniform(0.0, 0.2)))
    latest, restored = restore_latest(tmp_path, worker)
    assert at_step - 2 <= latest <= at_step
    assert int(restored.step) == latest
    assert_same_run(restored, uninterrupted[latest])

  proc = start(tmp_path)  # and the last resumed process runs to the end
  out, _ = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == 0 and out.strip().endswith("done"), out
  latest, final = restore_latest(tmp_path, worker)
  assert latest == STEPS
  assert_same_run(final, uninterrupted[STEPS])
