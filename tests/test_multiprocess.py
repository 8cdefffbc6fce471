"""Two JAX processes x 2 CPU devices: sharded training with EMAs on a global mesh.

The processes (tests/_multiprocess_worker.py) talk through
`jax.distributed.initialize` on 127.0.0.1 and gloo collectives; they train,
evaluate with the EMA swapped in, save and restore with Orbax's multi-process
checkpointing, train on, save post-hoc snapshots together and synthesize from
them. Every shard each process holds must equal the
same slice of a single-process run of the same code on 4 devices.

Deselect locally with `-m "not multiprocess"`; CI runs it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_multiprocess_worker.py"
NUM_PROCESSES = 2
TIMEOUT_S = 100  # the whole run; it takes about 20 s on 2 shared CPU cores


def load_worker():
  spec = importlib.util.spec_from_file_location("_multiprocess_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env() -> dict[str, str]:
  env = dict(os.environ)
  # Not the 8 devices conftest.py gives this process: 2 per worker.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  return env


def run_workers(out: pathlib.Path, checkpoint_dir: pathlib.Path) -> None:
  """Starts the workers and waits; kills them all on failure or timeout."""
  port = free_port()
  procs, logs = [], []
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for i in range(NUM_PROCESSES):
      log = open(out / f"process_{i}.log", "w+")
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, str(WORKER), "--process-id", str(i),
           "--num-processes", str(NUM_PROCESSES), "--port", str(port),
           "--out", str(out), "--checkpoint-dir", str(checkpoint_dir),
           "--timeout", str(TIMEOUT_S - 10)],
          env=worker_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
          start_new_session=True,  # its own process group, killed as one
      ))
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
    report = []
    for i, log in enumerate(logs):
      log.seek(0)
      report.append(f"--- process {i} (exit {procs[i].returncode}) ---\n"
                    + log.read()[-3000:])
      log.close()
  codes = [p.returncode for p in procs]
  assert codes == [0] * NUM_PROCESSES, "\n".join(report)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.multiprocess
def test_two_processes_match_a_single_process_reference(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  run_workers(out, tmp_path / "checkpoints")

  worker = load_worker()
  mesh = worker.make_mesh(jax.devices()[:4])
  reference = worker.train(mesh, str(tmp_path / "reference_checkpoints"))
  assert reference["restored_equal"]
  expected = {
      f"{group}/{name}": np.asarray(array.astype(jnp.float32))
      for group in worker.GROUPS
      for name, array in reference[group].items()
  }
  # The reference's own EMA is not trivially the params.
  assert not np.allclose(expected["ema/w1"], expected["params/w1"])
  # Its snapshots (step 4, and step 6 written by close()) give back the
  # tracked width, and another one that differs from it.
  assert list(reference["snapshot_steps"]) == [4, 6]
  for name in worker.SHAPES:
    np.testing.assert_allclose(
        expected[f"posthoc_010/{name}"], expected[f"tracked/{name}"], atol=1e-6
    )
  assert not np.allclose(expected["posthoc_020/w1"], expected["tracked/w1"])

  covered = {key: np.zeros(v.shape, int) for key, v in expected.items()}
  for i in range(NUM_PROCESSES):
    shards = dict(np.load(out / f"process_{i}.npz"))
    assert bool(shards.pop("restored_equal")), f"process {i}: restore differs"
    assert list(shards.pop("snapshot_steps")) == [4, 6], f"process {i}"
    assert int(shards.pop("count")) == 6
    for name in ("eval_loss", "final_eval_loss"):
      np.testing.assert_array_equal(
          shards.pop(name), np.asarray(reference[name]), err_msg=name
      )
    assert len(shards) > 0
    for key, data in shards.items():
      leaf, where = key.split("|")
      index = tuple(
          slice(*map(int, bounds.split(":"))) for bounds in where.split(",") if bounds
      )
      # Bit for bit: every reduction here is over 2 shards, and a + b does
      # not depend on the order; the bfloat16 EMA's rounding noise depends on
      # the key and the element's global index only, not on who computes it.
      np.testing.assert_array_equal(data, expected[leaf][index], err_msg=key)
      covered[leaf][index] += 1
  # Together the processes hold every element (each exactly as often as the
  # leaf is replicated over the mesh).
  for leaf, count in covered.items():
    assert count.min() >= 1 and count.min() == count.max(), leaf
