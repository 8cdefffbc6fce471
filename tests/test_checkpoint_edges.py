"""The checkpoint helpers and snapshots at the edges: fp8 states, bare-array
params, dotted keys, complex params, other Orbax layouts, missing steps, a
restore right after an asynchronous save, and a directory that fails mid-run.

Each case is right (checked against the state it came from) or refused by
name, never an Orbax internal error or a silent mix-up.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.linen import fp8_ops
from flax.training.train_state import TrainState

import ema_jax
import ema_jax.flax
from _util import assert_bitwise_equal
from ema_jax import posthoc

pytestmark = pytest.mark.standard_promotion  # optax and Flax are not strict-clean
OWG = fp8_ops.OVERWRITE_WITH_GRADIENT  # "_overwrite_with_gradient"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def tx():
  return optax.chain(optax.sgd(0.5), ema_jax.ema(0.5))


def manager(path):
  return ocp.CheckpointManager(path)


def saved(path, state, step=1, wait=True):
  m = manager(path)
  assert ema_jax.flax.save_checkpoint(m, step, state)
  if wait:
    m.wait_until_finished()
  return m


# --- Flax fp8 TrainStates ----------------------------------------------------------


def fp8_state(tx_):
  params = {"params": {"w": jnp.arange(3.0)}, OWG: {"scale": jnp.ones(())}}
  state = TrainState.create(apply_fn=None, params=params, tx=tx_)
  grads = {"params": {"w": jnp.ones(3)}, OWG: {"scale": jnp.full((), 2.0)}}
  return state.apply_gradients(grads=grads)


def test_fp8_train_states_swap_export_and_restore(tmp_path):
  state = fp8_state(tx())
  ema = ema_jax.ema_params(state.opt_state)
  np.testing.assert_array_equal(ema["w"], [-0.25, 0.75, 1.75])  # (w + (w - 0.5)) / 2
  exported = ema_jax.flax.export_ema(state)["params"]
  assert_bitwise_equal(exported["params"], ema)
  assert_bitwise_equal(exported[OWG], state.params[OWG])  # not averaged: as it is
  with ema_jax.flax.ema_weights(state) as swapped:
    assert_bitwise_equal(swapped.params["params"], ema)
    assert_bitwise_equal(swapped.params[OWG], state.params[OWG])
  for name, form in (("raw", state), ("swapped", swapped)):
    restored = ema_jax.flax.restore_checkpoint(saved(tmp_path / name, form), state)
    assert_bitwise_equal(
        (restored.params, restored.opt_state), (state.params, state.opt_state))
  plain = fp8_state(optax.sgd(0.5))
  restored = ema_jax.flax.restore_checkpoint(
      saved(tmp_path / "plain", plain), state, missing_ema="init")
  assert_bitwise_equal(restored.params, plain.params)
  assert int(restored.opt_state[1].count) == 0
  assert_bitwise_equal(restored.opt_state[1].ema, plain.params["params"])


# --- bare-array params ---------------------------------------------------------------


def test_bare_array_params_restore_from_a_swapped_checkpoint(tmp_path):
  params = jnp.arange(3.0)
  state = TrainState.create(apply_fn=None, params=params, tx=tx())
  updates, opt_state = state.tx.update(jnp.ones(3), state.opt_state, params)
  state = state.replace(step=1, params=optax.apply_updates(params, updates), opt_state=opt_state)
  swapped = ema_jax.flax.SwapEMAWeights().on_test_begin(state)
  assert not np.array_equal(swapped.params, state.params)
  restored = ema_jax.flax.restore_checkpoint(saved(tmp_path, swapped), state)
  assert_bitwise_equal((restored.params, restored.opt_state), (state.params, state.opt_state))
  assert_bitwise_equal(ema_jax.flax.export_ema(state)["params"], swapped.params)
  plain = TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.5))
  updates, _ = plain.tx.update(jnp.ones(3), plain.opt_state, params)
  plain = plain.replace(step=1, params=optax.apply_updates(params, updates))
  restored = ema_jax.flax.restore_checkpoint(
      saved(tmp_path / "plain", plain), state, missing_ema="init")
  assert_bitwise_equal(restored.params, plain.params)
  assert int(restored.opt_state[1].count) == 0
  assert_bitwise_equal(restored.opt_state[1].ema, plain.params)


# --- what the checkpoint holds -------------------------------------------------------


def linen_state(params=None):
  params = {"w": jnp.arange(3.0)} if params is None else params
  state = TrainState.create(apply_fn=None, params=params, tx=tx())
  return state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))


def test_restore_right_after_an_asynchronous_save_waits_for_it(tmp_path):
  state = linen_state()
  m = saved(tmp_path, state, wait=False)  # still being written
  restored = ema_jax.flax.restore_checkpoint(m, state)
  assert_bitwise_equal((restored.params, restored.opt_state), (state.params, state.opt_state))


def test_a_missing_step_and_other_layouts_are_named(tmp_path):
  state = linen_state()
  m = saved(tmp_path / "ours", state, step=3)
  with pytest.raises(FileNotFoundError, match=r"No checkpoint of step 7 in .*ours; the steps there are \[3\]"):
    ema_jax.flax.restore_checkpoint(m, state, step=7)
  m = manager(tmp_path / "pytree")
  m.save(1, args=ocp.args.PyTreeSave(state))
  m.wait_until_finished()
  with pytest.raises(ValueError, match=r"not one `save_checkpoint` writes.*`default` \(PyTreeCheckpointHandler\)"):
    ema_jax.flax.restore_checkpoint(manager(tmp_path / "pytree"), state)
  m = manager(tmp_path / "composite")
  m.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave({"a": 1})))
  m.wait_until_finished()
  with pytest.raises(ValueError, match=(
      r"not one `save_checkpoint` writes.*`extra` \(JsonCheckpointHandler\), "
      r"`state` \(StandardCheckpointHandler\)")):
    ema_jax.flax.restore_checkpoint(manager(tmp_path / "composite"), state)


def test_keys_that_collide_once_joined_by_dots_are_refused(tmp_path):
  params = {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}
  state = linen_state(params)
  # The hook and export need no names: they work.
  assert_bitwise_equal(ema_jax.flax.export_ema(state)["params"], ema_jax.ema_params(state.opt_state))
  with pytest.raises(ValueError, match=(
      r"Cannot checkpoint step 1: leaves .params\['a'\]\['b'\] and .params\['a.b'\] "
      r"would both be stored as `params.a.b`")):
    ema_jax.flax.save_checkpoint(manager(tmp_path / "c"), 1, state)
  snapshotter = posthoc.Snapshotter(tmp_path / "s", every=1)
  track = snapshotter.ema()
  _, opt_state = track.update(params, track.init(params), params)
  with pytest.raises(ValueError, match=r"\['a'\]\['b'\] and .*\['a.b'\] would both be stored"):
    snapshotter.maybe_save(opt_state)
  with pytest.raises(ValueError, match="would both be stored"):
    snapshotter.close()  # nor as the tail; and Orbax is released all the same
  assert snapshotter._closed and snapshotter._lock._file.closed


BROKEN = """
import shutil, sys, jax.numpy as jnp, optax, ema_jax, ema_jax.flax
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState
directory = sys.argv[1]
state = TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)},
                          tx=optax.chain(optax.sgd(0.1), ema_jax.ema(0.9)))
manager = ocp.CheckpointManager(directory)
print("save 1", ema_jax.flax.save_checkpoint(manager, 1, state), flush=True)
manager.wait_until_finished()
shutil.rmtree(directory)
open(directory, "w").close()  # root writes anywhere: a file stops everyone
try:
  print("save 2", ema_jax.flax.save_checkpoint(manager, 2, state), flush=True)
except RuntimeError as e:
  print("save 2 raised", str(e).splitlines()[0], flush=True)
try:
  manager.close()
except Exception as e:
  print("close raised", type(e).__name__, flush=True)
print("exiting", flush=True)
"""


def test_a_checkpoint_that_cannot_be_written_fails_the_save(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  directory = tmp_path / "ckpt"
  proc = subprocess.run(
      [sys.executable, "-c", BROKEN, str(directory)], env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=60,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "save 1 True", lines
  assert lines[1].startswith(
      f"save 2 raised The checkpoint of step 2 could not be written to '{directory}': "
      "NotADirectoryError"), lines
  assert lines[-1] == "exiting", lines


def test_a_write_failing_in_orbax_thread_is_raised_by_the_next_save(tmp_path, monkeypatch):
  # Orbax's finalize thread takes its checkpointer's error: `check_for_errors`
  # misses it, only `wait_until_finished` raises it (once).
  from test_posthoc_writers import fail_finalizing

  fail_finalizing(monkeypatch, [1])
  state = TrainState.create(apply_fn=None, params=jnp.zeros(2),
                            tx=optax.chain(optax.sgd(0.1), ema_jax.ema(0.9)))
  with ocp.CheckpointManager(tmp_path) as manager:
    assert ema_jax.flax.save_checkpoint(manager, 1, state)
    for _ in range(6000):  # until the write is over, a minute at most
      if not manager.is_saving_in_progress():
        break
      threading.Event().wait(0.01)
    with pytest.raises(RuntimeError, match=(
        rf"An earlier asynchronous checkpoint could not be written to '{tmp_path}': "
        r"OSError: \[Errno 28\] No space left on device")):
      ema_jax.flax.save_checkpoint(manager, 2, state)
    assert ema_jax.flax.save_checkpoint(manager, 3, state)
    manager.wait_until_finished()
    assert manager.all_steps() == [3]


# --- snapshots of complex params, and `like` of another kind -------------------------


def test_complex_params_snapshot_and_synthesize_as_complex(tmp_path):
  rng = np.random.default_rng(0)
  with posthoc.Snapshotter(tmp_path, every=5) as snapshotter:
    track = snapshotter.ema()
    params = {"z": jnp.zeros(4, jnp.complex64), "r": jnp.zeros(2)}
    state = track.init(params)
    for t in range(1, 21):
      target = {
          "z": jnp.asarray(rng.normal(size=4) + 1j * rng.normal(size=4), jnp.complex64),
          "r": jnp.asarray(rng.normal(size=2), jnp.float32),
      }
      _, state = track.update(params, state, target)
      snapshotter.maybe_save(state)
  got = posthoc.synthesize(tmp_path, sigma_rel=0.10)
  assert got["z"].dtype == jnp.complex64 and got["r"].dtype == jnp.float32
  want = ema_jax.ema_params(state, index=1)
  np.testing.assert_allclose(got["z"], want["z"], rtol=1e-5, atol=1e-6)
  assert np.abs(np.imag(np.asarray(got["z"]))).max() > 0.05  # not the real part alone
  np.testing.assert_allclose(
      posthoc.synthesize(tmp_path, sigma_rel=0.10, like=params)["z"], want["z"],
      rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"`like` is not the tree.*\['z'\] has dtype float32 in `like` but complex64"):
    posthoc.synthesize(tmp_path, sigma_rel=0.1, like={"z": jnp.zeros(4), "r": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"`like` is not the tree.*\['r'\] has kind carry in `like` but average"):
    posthoc.synthesize(tmp_path, sigma_rel=0.1, like={"z": params["z"], "r": jnp.zeros(2, jnp.int32)})
