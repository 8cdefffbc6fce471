"""Post-hoc snapshots where runs meet each other or the file system.

A second writer on a directory (in this process or another) is refused when
built, naming the holder, and takes over once the holder closes or dies;
threads share one Snapshotter; a directory that cannot take a snapshot fails
the save that reports it, and the process still exits; a run from scratch
never mixes its snapshots with an older run's. Each test takes seconds.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax
from ema_jax import posthoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 60


def env() -> dict[str, str]:
  out = dict(os.environ, JAX_PLATFORMS="cpu")
  out.pop("JAX_NUM_CPU_DEVICES", None)
  out["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  return out


def track(snapshotter, steps, params=None, start=None):
  """`params + t` for t = 1..steps; `maybe_save` after each; the last state."""
  params = {"w": jnp.zeros(3)} if params is None else params
  tx = snapshotter.ema()
  state = tx.init(params) if start is None else start
  for t in range(int(state.count) + 1, steps + 1):
    _, state = tx.update(params, state, jax.tree.map(lambda p: p + t, params))
    snapshotter.maybe_save(state, step=t)
  return state


# --- one writer per directory ----------------------------------------------------


def test_a_second_writer_in_this_process_is_refused_until_the_first_closes(tmp_path):
  first = posthoc.Snapshotter(tmp_path, every=2)
  track(first, 4)
  with pytest.raises(ValueError, match=(
      rf"'{tmp_path}' is in use by another Snapshotter: process {os.getpid()} on "
      rf"{socket.gethostname()}, since .*this process: close\(\) the other")):
    posthoc.Snapshotter(tmp_path, every=2, existing="resume")
  first.close()
  with posthoc.Snapshotter(tmp_path, every=2, existing="resume") as again:
    assert again.steps == (2, 4)


def test_a_second_writer_in_this_process_is_refused_without_flock(tmp_path, monkeypatch):
  # On NFS, Linux emulates flock with POSIX locks, which one process never
  # conflicts with itself on: this process's own record refuses it.
  monkeypatch.setattr(posthoc.fcntl, "flock", lambda *args: None)
  first = posthoc.Snapshotter(tmp_path, every=2)
  with pytest.raises(ValueError, match=r"in use by another Snapshotter.*this process"):
    posthoc.Snapshotter(tmp_path / ".." / tmp_path.name, every=2)  # another spelling
  first.close()
  posthoc.Snapshotter(tmp_path, every=2).close()


HOLDER = """
import sys, time, ema_jax
s = ema_jax.posthoc.Snapshotter(sys.argv[1], every=2)
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_writer_in_another_process_is_refused_and_a_crash_frees_it(tmp_path):
  proc = subprocess.Popen(
      [sys.executable, "-c", HOLDER, str(tmp_path)], env=env(), cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )
  try:
    line = proc.stdout.readline()
    assert line.strip() == "holding", proc.stderr.read()[-3000:]
    with pytest.raises(ValueError, match=(
        rf"in use by another Snapshotter: process {proc.pid} on "
        rf"{socket.gethostname()}, since \d{{4}}-.*A crashed run's lock is released")):
      posthoc.Snapshotter(tmp_path, every=2)
    proc.send_signal(signal.SIGKILL)  # a crash: no close(), no cleanup
    proc.wait(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  # The kernel dropped the dead process's lock: the next run takes over.
  with posthoc.Snapshotter(tmp_path, every=2) as taken:
    track(taken, 2)
  assert taken.steps == (2,)


FORKED = """
import os, signal, sys, time, jax.numpy as jnp, ema_jax
directory = sys.argv[1]
s = ema_jax.posthoc.Snapshotter(directory, every=1)
tx = s.ema()
params = jnp.zeros(3)
_, state = tx.update(params, tx.init(params), params + 1)
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # the child touches no JAX: only the Snapshotter's methods
  os.close(r)
  out = []
  for name, call in [("maybe_save", lambda: s.maybe_save(state, step=1)),
                     ("save", lambda: s.save(state)),
                     ("wait_until_finished", s.wait_until_finished),
                     ("close", s.close)]:
    try:
      call()
      out.append(name + " wrote")
    except ValueError as e:
      out.append(name + " refused: " + str(e).splitlines()[0])
  os.write(w, ("\\n".join(out) + "\\n").encode())
  os.close(w)
  time.sleep(120)  # alive while the parent closes and another run takes over
  os._exit(0)
os.close(w)
with os.fdopen(r) as lines:
  for line in lines:
    print("child", line.strip(), flush=True)
try:
  print("parent saved", s.maybe_save(state, step=1), flush=True)
  s.close()  # the parent's Snapshotter is unharmed, and releases the lock
  print("parent closed", s.steps, flush=True)
  with ema_jax.posthoc.Snapshotter(directory, every=1, existing="resume") as again:
    print("taken over while the child lives", again.steps, flush=True)
finally:
  os.kill(pid, signal.SIGKILL)
  os.waitpid(pid, 0)
"""


def test_a_forked_child_cannot_write_and_holds_no_lock(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-W", "ignore", "-c", FORKED, str(tmp_path)], env=env(),
      cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  refused = (
      rf"refused: This Snapshotter of '{tmp_path}' belongs to process \d+; "
      r"process \d+ is a child forked from it"
  )
  for line, name in zip(lines, ["maybe_save", "save", "wait_until_finished", "close"]):
    assert re.fullmatch(rf"child {name} {refused}.*", line), lines
  assert lines[4:] == [
      "parent saved True", "parent closed (1,)", "taken over while the child lives (1,)",
  ], (
      lines, proc.stderr[-3000:])


# --- threads -----------------------------------------------------------------------


def test_threads_share_one_snapshotter(tmp_path):
  snapshotter = posthoc.Snapshotter(tmp_path, every=2)
  tx = snapshotter.ema()
  params = {"w": jnp.zeros(3)}
  states = [tx.init(params)]
  for t in range(1, 7):
    states.append(tx.update(params, states[-1], {"w": jnp.full(3, t, jnp.float32)})[1])
  results: dict[tuple[int, int], object] = {}
  barrier = threading.Barrier(8)

  def work(i):
    barrier.wait()
    for t in range(1, 7):  # every thread saves every step, at the same time
      try:
        results[i, t] = snapshotter.maybe_save(states[t], step=t)
      except Exception as e:  # noqa: BLE001  # reported below
        results[i, t] = e

  threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(TIMEOUT_S)
  errors = [r for r in results.values() if isinstance(r, Exception)]
  assert not errors, errors[:3]
  for t in range(1, 7):  # each snapshot written once, by one of the threads
    assert sum(results[i, t] is True for i in range(8)) == (t % 2 == 0), t
  snapshotter.close()
  assert snapshotter.steps == (2, 4, 6)
  np.testing.assert_array_equal(
      posthoc.synthesize(tmp_path, sigma_rel=0.1)["w"],
      ema_jax.ema_params(states[6], index=1)["w"],
  )


# --- a directory that cannot take a snapshot -------------------------------------


def test_a_directory_that_takes_no_file_fails_when_built(tmp_path):
  # Root writes anywhere: a path through a regular file fails for everyone.
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(NotADirectoryError, match=r"snapshot directory '.*file/snapshots'"):
    posthoc.Snapshotter(tmp_path / "file" / "snapshots", every=2)
  # A directory that exists but takes no file, for root too (procfs).
  with pytest.raises(OSError, match=r"Cannot write to the snapshot directory '/proc/self'"):
    posthoc.Snapshotter("/proc/self", every=2)
  with pytest.raises(ValueError, match=r"`directory` must be a local path, got 'gs://b/s'"):
    posthoc.Snapshotter("gs://b/s", every=2)
  assert not os.path.exists("gs:")


BROKEN = """
import os, shutil, sys, jax.numpy as jnp, ema_jax
directory = sys.argv[1]
s = ema_jax.posthoc.Snapshotter(directory, every=2)
tx = s.ema()
params = jnp.zeros(3)
state = tx.init(params)
for t in range(1, 5):
  _, state = tx.update(params, state, params + t)
  if t == 3:  # the directory goes away: a regular file takes its place
    s.wait_until_finished()
    shutil.rmtree(directory)
    open(directory, "w").close()
  try:
    print("step", t, s.maybe_save(state, step=t), flush=True)
  except RuntimeError as e:
    print("step", t, "raised", str(e).splitlines()[0], flush=True)
try:
  s.close()
except RuntimeError as e:
  print("close raised", str(e).splitlines()[0], flush=True)
print("exiting", flush=True)
"""


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_save_is_raised_at_once_and_the_process_exits(tmp_path, async_save):
  directory = tmp_path / "snapshots"
  script = BROKEN.replace("every=2)", f"every=2, async_save={async_save})")
  proc = subprocess.run(
      [sys.executable, "-c", script, str(directory)], env=env(), cwd=ROOT,
      capture_output=True, text=True, timeout=TIMEOUT_S,  # a hang fails here
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[:3] == ["step 1 False", "step 2 True", "step 3 False"], lines
  # Step 4 is never reported saved: the save raises, naming what and where.
  assert lines[3].startswith(
      f"step 4 raised The snapshot of step 4 could not be written to '{directory}': "
      "NotADirectoryError"), lines
  assert lines[4].startswith("close raised The snapshot of step 4"), lines
  assert lines[5:] == ["exiting"], lines


def test_a_write_failing_in_the_background_is_raised_by_the_next_call(tmp_path, monkeypatch):
  snapshotter = posthoc.Snapshotter(tmp_path, every=2)
  state = track(snapshotter, 2)
  snapshotter.wait_until_finished()
  # As Orbax reports a write that failed in its thread (e.g. a full disk).
  manager = snapshotter._manager
  calls = []

  def check_for_errors():
    if not calls:
      calls.append(1)
      raise OSError(28, "No space left on device")

  monkeypatch.setattr(manager, "check_for_errors", check_for_errors)
  monkeypatch.setattr(manager, "all_steps", lambda: [])  # step 2 never landed
  with pytest.raises(RuntimeError, match=(
      rf"snapshot of step 2 could not be written to '{tmp_path}': OSError: "
      r"\[Errno 28\] No space left")):
    snapshotter.maybe_save(state, step=3)
  assert 2 not in snapshotter._saved  # so that it can be written again
  monkeypatch.undo()
  snapshotter.close()


def fail_finalizing(monkeypatch, steps):
  """Orbax's background write of `steps` fails as it finishes (a full disk)."""
  from orbax.checkpoint._src.path import atomicity

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def failing(self, *args, **kwargs):
    if self.get_final().name in {str(s) for s in steps}:
      raise OSError(28, "No space left on device")
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", failing)


def finished(snapshotter):
  """Wait, without asking the Snapshotter, until Orbax's write is over."""
  for _ in range(TIMEOUT_S * 100):
    if not snapshotter._manager.is_saving_in_progress():
      return
    threading.Event().wait(0.01)
  raise AssertionError("the background write never finished")


@pytest.mark.parametrize("reported_by", ["maybe_save", "the next save", "close"])
def test_a_real_background_failure_is_raised_naming_its_step(tmp_path, monkeypatch, reported_by):
  # Orbax's finalize thread consumes its checkpointer's error: only
  # `wait_until_finished` raises it, once (`check_for_errors` does not).
  fail_finalizing(monkeypatch, [2])
  snapshotter = posthoc.Snapshotter(tmp_path, every=2)
  tx = snapshotter.ema()
  params = jnp.zeros(3)
  states = [tx.init(params)]
  for t in range(1, 7):
    states.append(tx.update(params, states[-1], params + t)[1])
  assert snapshotter.maybe_save(states[2], step=2)  # started
  finished(snapshotter)
  failed = rf"The snapshot of step 2 could not be written to '{tmp_path}': OSError: \[Errno 28\]"
  with pytest.raises(RuntimeError, match=failed):
    if reported_by == "maybe_save":
      snapshotter.maybe_save(states[3], step=3)
    elif reported_by == "the next save":
      snapshotter.maybe_save(states[4], step=4)
    else:
      snapshotter.close()
  if reported_by != "close":
    # Reported once; the run goes on, and step 2 can be written again.
    assert not snapshotter.maybe_save(states[5], step=5)
    assert snapshotter.maybe_save(states[6], step=6)
    snapshotter.close()
    # The save that reported it did not start its own step.
    assert snapshotter.steps == (6,)
  else:
    assert snapshotter.steps == ()


def test_a_resumed_run_is_warned_of_snapshots_lost_for_good(tmp_path):
  params = {"w": jnp.zeros(3)}
  with posthoc.Snapshotter(tmp_path, every=5, save_on_close=False) as first:
    track(first, 10)
  # The process ended while snapshot 15 was written; the checkpoint of step
  # 17 had finished first. Resumed there, steps 15 cannot be written again.
  again = posthoc.Snapshotter(tmp_path, every=5, existing="resume")
  tx = again.ema()
  state = tx.init(params)
  for t in range(1, 18):
    _, state = tx.update(params, state, jax.tree.map(lambda p: p + t, params))
  with pytest.warns(UserWarning, match=(
      r"snapshots of step 15 are not in .* this run starts after them \(step 17\).*"
      r"checkpoint at or before step 15.*wait_until_finished")):
    assert not again.maybe_save(state, step=17)
  again.close()
  assert again.steps == (5, 10, 17)
  # Resumed at the latest snapshot or before it: nothing is lost, no warning.
  with posthoc.Snapshotter(tmp_path, every=5, existing="resume") as last:
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      assert last.save(state) is None


def test_calls_after_close_are_refused(tmp_path):
  snapshotter = posthoc.Snapshotter(tmp_path, every=2)
  state = track(snapshotter, 2)
  snapshotter.close()
  snapshotter.close()  # twice is fine
  with pytest.raises(ValueError, match=r"is closed.*existing=\"resume\""):
    snapshotter.maybe_save(state, step=2)
  assert snapshotter.steps == (2,)


# --- a run from scratch never meets an older run's snapshots -----------------------


def test_a_run_from_scratch_into_an_older_runs_directory(tmp_path):
  with posthoc.Snapshotter(tmp_path / "run", every=5) as old:
    track(old, 20, params={"w": jnp.full(3, 0.5)})  # another run's data
  with pytest.raises(ValueError, match=(
      r"holds the snapshots of another run \(steps 5, 10, 15, 20\).*"
      r"existing=\"resume\".*existing=\"move_aside\"")):
    posthoc.Snapshotter(tmp_path / "run", every=5)
  # Moved aside: the new run's snapshots alone, the old ones kept beside.
  with posthoc.Snapshotter(tmp_path / "run", every=5, existing="move_aside") as new:
    state = track(new, 12)
  assert new.moved_to is not None and new.moved_to.startswith(str(tmp_path / "run.moved-"))
  assert new.steps == (5, 10, 12)
  with posthoc.Snapshotter(tmp_path / "fresh", every=5) as fresh:
    track(fresh, 12)
  for sigma in (0.05, 0.1, 0.2):
    np.testing.assert_array_equal(
        posthoc.synthesize(tmp_path / "run", sigma)["w"],
        posthoc.synthesize(tmp_path / "fresh", sigma)["w"],
    )
  np.testing.assert_array_equal(
      posthoc.synthesize(tmp_path / "run", 0.1)["w"], ema_jax.ema_params(state, index=1)["w"]
  )
  assert posthoc.synthesize(new.moved_to, 0.1, step=20)["w"][0] > 10  # the old run's
