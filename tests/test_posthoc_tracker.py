"""The tracker must be `Snapshotter.ema()`'s power pair, whatever happened to it.

`synthesize` combines the snapshots as power profiles of the Snapshotter's
widths, so a `multi_ema` of other decays (or other widths, or another
`update_every`) snapshotted by `maybe_save` is a silent wrong answer. The
state of a `multi_ema` of `power_decay`s records its profile, and `maybe_save`
and `save` refuse any other, at every step, with stochastic rounding and
offloaded averages too. The record travels with the state through `jit`,
`swap`, every optax wrapper, Orbax checkpoints and `restore_checkpoint`
(Linen and NNX, `nnx.cached_partial` included).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training.train_state import TrainState

import ema_jax
import ema_jax.flax
from ema_jax import _compat
from ema_jax import posthoc
from test_restore_wrappers import WRAPPERS

PARAMS = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
TARGET = {"w": jnp.arange(3.0), "b": jnp.ones(2)}
# The Snapshotter's default widths, and other ones.
POWER = [ema_jax.power_decay(sigma_rel=0.05), ema_jax.power_decay(sigma_rel=0.10)]

needs_memory_spaces = pytest.mark.skipif(
    not _compat.MEMORY_SPACES, reason="memory kinds need jax>=0.10.2"
)

OTHERS = {
    "constant decays": lambda: ema_jax.multi_ema([0.9, 0.99]),
    "constant decays, stochastic rounding": lambda: ema_jax.multi_ema(
        [0.9, 0.99], ema_dtype=jnp.bfloat16, rounding="stochastic"),
    "constant decays, offloaded": pytest.param(
        lambda: ema_jax.multi_ema([0.9, 0.99], memory_kind="pinned_host"),
        marks=needs_memory_spaces),
    "power decays of other widths": lambda: ema_jax.multi_ema(
        [ema_jax.power_decay(gamma=3.0), ema_jax.power_decay(gamma=5.0)]),
    "the widths in the other order": lambda: ema_jax.multi_ema(POWER[::-1]),
    "another update_every": lambda: ema_jax.multi_ema(POWER, update_every=2),
    "a start_step": lambda: ema_jax.multi_ema(POWER, start_step=3),
    "a scaled power decay": lambda: ema_jax.multi_ema(
        [ema_jax.scale_decay(POWER[0], 2.0), POWER[1]]),
    "power and constant": lambda: ema_jax.multi_ema([POWER[0], 0.99]),
    "three power decays": lambda: ema_jax.multi_ema(
        [*POWER, ema_jax.power_decay(sigma_rel=0.2)]),
}


@pytest.mark.parametrize("first_seen", [1, 4], ids=["from step 1", "resumed at step 4"])
@pytest.mark.parametrize("make", list(OTHERS.values()), ids=list(OTHERS))
def test_any_other_multi_ema_is_refused_at_every_step(tmp_path, make, first_seen):
  tx = make()
  state = tx.init(PARAMS)
  for _ in range(first_seen):
    _, state = jax.jit(tx.update)(PARAMS, state, TARGET)
  with posthoc.Snapshotter(tmp_path, every=1) as snapshotter:
    with pytest.raises(ValueError, match=r"snapshotter\.ema\(\)") as info:
      snapshotter.maybe_save(state)
    with pytest.raises(ValueError, match=r"snapshotter\.ema\(\)"):
      snapshotter.save(state)
  message = str(info.value)
  assert "sigma_rels (0.05, 0.1)" in message, message  # what it tracks
  assert snapshotter.steps == ()


def test_the_message_names_the_profile_found(tmp_path):
  state = ema_jax.multi_ema(
      [ema_jax.power_decay(sigma_rel=0.2), ema_jax.power_decay(sigma_rel=0.15)],
      update_every=2).init(PARAMS)
  with posthoc.Snapshotter(tmp_path, every=2) as snapshotter:
    with pytest.raises(ValueError, match=(
        r"power-function EMAs of sigma_rels \(0\.2, 0\.15\) with update_every=2; "
        r"this Snapshotter tracks sigma_rels \(0\.05, 0\.1\) with update_every=1")):
      snapshotter.save(state._replace(count=jnp.int32(2)))
  state = ema_jax.multi_ema([0.9, 0.99]).init(PARAMS)
  with posthoc.Snapshotter(tmp_path, every=2, existing="resume") as snapshotter:
    with pytest.raises(ValueError, match=r"records no power profile.*`power_decay`"):
      snapshotter.save(state._replace(count=jnp.int32(2)))


def test_a_hand_built_power_pair_of_the_same_widths_is_accepted(tmp_path):
  snapshotter = posthoc.Snapshotter(tmp_path, every=2, gammas=[
      ema_jax.sigma_rel_to_gamma(0.05), ema_jax.sigma_rel_to_gamma(0.10)])
  tx = ema_jax.multi_ema(POWER, debias=True, ema_dtype=jnp.bfloat16,
                         rounding="stochastic")
  state = tx.init(PARAMS)
  for t in range(1, 5):
    _, state = tx.update(PARAMS, state, TARGET)
    assert snapshotter.maybe_save(state) == (t % 2 == 0)
  snapshotter.close()
  assert snapshotter.steps == (2, 4)


def test_a_reset_tracker_is_refused(tmp_path):
  # The averages restart at the params at step t: no longer power profiles.
  snapshotter = posthoc.Snapshotter(tmp_path, every=1)
  tx = snapshotter.ema()
  state = tx.init(PARAMS)
  # Reset before any update: the first update copies anyway.
  state = ema_jax.reset(state, TARGET)
  _, state = tx.update(PARAMS, state, TARGET)
  assert snapshotter.maybe_save(state)
  state = ema_jax.reset(state, PARAMS)
  with pytest.raises(ValueError, match=r"reset"):
    snapshotter.maybe_save(state)
  # Jitted, the count is not known: refused as well.
  state = jax.jit(ema_jax.reset)(tx.init(PARAMS), TARGET)
  _, state = tx.update(PARAMS, state, TARGET)
  with pytest.raises(ValueError, match=r"reset"):
    snapshotter.save(state)
  snapshotter.close()


def test_an_update_by_another_multi_ema_drops_the_profile(tmp_path):
  power = ema_jax.multi_ema(POWER)
  other = ema_jax.multi_ema([0.9, 0.99])
  state = power.init(PARAMS)
  _, state = power.update(PARAMS, state, TARGET)
  _, state = other.update(PARAMS, state, TARGET)
  with posthoc.Snapshotter(tmp_path, every=1) as snapshotter:
    with pytest.raises(ValueError, match=r"records no power profile"):
      snapshotter.save(state)


def test_swap_and_back_keeps_the_profile(tmp_path):
  snapshotter = posthoc.Snapshotter(tmp_path, every=1)
  tx = snapshotter.ema()
  state = tx.init(PARAMS)
  _, state = tx.update(PARAMS, state, TARGET)
  weights, swapped = ema_jax.swap(TARGET, state, index=1)
  params, back = jax.jit(ema_jax.swap)(weights, swapped)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  assert snapshotter.maybe_save(back)
  snapshotter.close()


@pytest.mark.standard_promotion  # optax's wrappers are not strict-clean
@pytest.mark.parametrize("name", WRAPPERS)
@pytest.mark.parametrize("power", [True, False], ids=["ema()", "multi_ema([0.9, 0.99])"])
def test_the_profile_travels_through_wrappers_and_jit(tmp_path, name, power):
  snapshotter = posthoc.Snapshotter(tmp_path, every=1)
  tracker = snapshotter.ema() if power else ema_jax.multi_ema([0.9, 0.99])
  tx = WRAPPERS[name](optax.chain(optax.sgd(0.1), tracker))
  state = tx.init(PARAMS)
  params = PARAMS
  step = jax.jit(tx.update)
  for _ in range(4):  # MultiSteps(2): two real updates
    updates, state = step(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
  if power:
    assert snapshotter.save(state) == int(ema_jax._state.find(state, None)[1].count)
  else:
    with pytest.raises(ValueError, match=r"records no power profile"):
      snapshotter.save(state)
  snapshotter.close()


class OldMultiEmaState(NamedTuple):
  """`MultiEmaState` as it was before it recorded a power profile."""

  count: Any
  ema: Any
  debias_norm: Any = None
  rounding_key: Any = None


@pytest.mark.standard_promotion
@pytest.mark.parametrize("abstract", [False, True], ids=["template", "abstract template"])
def test_the_profile_comes_back_from_a_linen_checkpoint(tmp_path, abstract):
  snapshotter = posthoc.Snapshotter(tmp_path / "snapshots", every=1)
  tx = optax.chain(optax.sgd(0.1), snapshotter.ema())
  state = TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  for _ in range(3):
    state = jax.jit(lambda s: s.apply_gradients(grads=grads))(state)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    assert ema_jax.flax.save_checkpoint(manager, 3, state)
    manager.wait_until_finished()
    template = TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
    if abstract:
      template = jax.eval_shape(lambda: template)
    restored = ema_jax.flax.restore_checkpoint(manager, template)
  assert snapshotter.save(restored.opt_state) == 3
  # Nothing of the record is on disk: a checkpoint written before it existed
  # (the state without the field, the same leaves) restores with it too.
  tracker = state.opt_state[1]
  old = state.replace(opt_state=(state.opt_state[0], OldMultiEmaState(
      tracker.count, tracker.ema, tracker.debias_norm, tracker.rounding_key)))
  with ocp.CheckpointManager(tmp_path / "old") as manager:
    assert ema_jax.flax.save_checkpoint(manager, 3, old)
    manager.wait_until_finished()
    assert sorted(ocp.StandardCheckpointHandler().metadata(
        tmp_path / "old" / "3" / "default").tree["opt_state"][1]) == [
            "count", "debias_norm", "ema", "rounding_key"]
    restored = ema_jax.flax.restore_checkpoint(manager, template)
  assert ema_jax._state.find(restored.opt_state, None)[1].power_profile is not None
  # Restored into the template of another multi_ema, it is that one's.
  other = optax.chain(optax.sgd(0.1), ema_jax.multi_ema([0.9, 0.99]))
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    restored = ema_jax.flax.restore_checkpoint(
        manager, TrainState.create(apply_fn=None, params=PARAMS, tx=other))
  with pytest.raises(ValueError, match=r"records no power profile"):
    snapshotter.save(restored.opt_state)
  snapshotter.close()


@pytest.mark.standard_promotion
@pytest.mark.parametrize("cached", [False, True], ids=["nnx.jit", "nnx.cached_partial"])
def test_the_profile_travels_with_nnx(tmp_path, cached):
  snapshotter = posthoc.Snapshotter(tmp_path / "snapshots", every=1)
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.sgd(0.1), snapshotter.ema()), wrt=nnx.Param)

  def train_step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)

  step = nnx.jit(train_step)
  if cached:
    step = nnx.cached_partial(step, model, optimizer)
  x = jnp.ones((4, 2))
  for _ in range(3):
    step(x) if cached else step(model, optimizer, x)
  assert snapshotter.save(nnx.as_pure(optimizer.opt_state)) == 3
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    assert ema_jax.flax.save_checkpoint(manager, 3, model, optimizer)
    manager.wait_until_finished()
    fresh = nnx.Linear(2, 3, rngs=nnx.Rngs(1))
    fresh_optimizer = nnx.Optimizer(
        fresh, optax.chain(optax.sgd(0.1), snapshotter.ema()), wrt=nnx.Param)
    ema_jax.flax.restore_checkpoint(manager, fresh, fresh_optimizer)
  step = nnx.jit(train_step)
  step(fresh, fresh_optimizer, x)
  assert snapshotter.save(nnx.as_pure(fresh_optimizer.opt_state)) == 4
  snapshotter.close()
