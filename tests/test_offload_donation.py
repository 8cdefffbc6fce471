"""Donation with an offloaded EMA: the documented patterns work, for every state kind.

JAX pairs a jit's donated inputs with its outputs by shape and dtype, and
ignores memory kinds unless every input and output placement is known; an
offloaded EMA leaf donated alone can then be aliased to a device output of
its shape, and XLA's CPU runtime aborts the process. The patterns in
docs/offload.md avoid that; each runs in a subprocess here, so an abort fails
the test instead of killing the test run.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

from test_offload import needs_memory_spaces

pytestmark = needs_memory_spaces

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_donation_worker.py"


def run(what):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return subprocess.run(
      [sys.executable, str(WORKER), what], capture_output=True, text=True,
      env=env, cwd=ROOT, timeout=300,
  )


def test_documented_donation_patterns_work_for_every_offloaded_state():
  result = run("recipes")
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  lines = result.stdout.split()
  assert lines[-1] == "done"
  # 7 kinds x (step, pass-through) x (donate both, donate the state with placements)
  assert result.stdout.count("ok ") == 28, result.stdout


def test_the_upstream_abort_is_still_there():
  """The pure-JAX reproducer of docs/offload.md still aborts with this JAX.

  When this fails, JAX has fixed the pairing: update docs/offload.md (the
  plain `donate_argnums=1` step may then be documented as safe).
  """
  result = run("reproducer")
  assert result.returncode == -signal.SIGABRT, (result.returncode, result.stdout)
  assert "memory kind does not match" in result.stderr
