"""The checkpoint helpers with the EMA inside any optax wrapper.

`MultiSteps`, `apply_if_finite`, `masked`, `multi_transform` and
`inject_hyperparams` around `chain(opt, ema)`: a checkpoint restores bit for
bit, raw or swapped, `export_ema` gives the EMA, and a checkpoint of the same
wrapper without the EMA is recognised as having none (`missing_ema="init"`
then starts the EMA from the restored params), in Linen and NNX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training.train_state import TrainState

import ema_jax
import ema_jax.flax
from _util import assert_bitwise_equal
from test_restore_checks import GRADS, PARAMS, nnx_pair, nnx_train, restore, save

pytestmark = pytest.mark.standard_promotion  # optax is not strict-clean


def _labels(params):
  return jax.tree.map(lambda _: "x", params) | {"b": "y"} if isinstance(params, dict) else (
      jax.tree.map(lambda _: "x", params))


WRAPPERS = {
    "MultiSteps": lambda inner: optax.MultiSteps(inner, 2),
    "apply_if_finite": lambda inner: optax.apply_if_finite(inner, 3),
    "masked": lambda inner: optax.masked(inner, lambda p: jax.tree.map(lambda _: True, p)),
    "multi_transform": lambda inner: optax.multi_transform(
        {"x": inner, "y": optax.sgd(0.5)}, _labels),
    "inject_hyperparams": lambda inner: optax.inject_hyperparams(
        lambda learning_rate: optax.chain(optax.scale(learning_rate), inner)
    )(learning_rate=0.5),
}
INNER = lambda: optax.adam(0.1)  # noqa: E731


def with_ema(wrap):
  return wrap(optax.chain(INNER(), ema_jax.ema(0.5)))


def trained(tx, steps=4):
  state = TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
  for _ in range(steps):
    state = state.apply_gradients(grads=GRADS)
  return state


def not_ema(opt_state):
  """The optimizer state's leaves outside its EMA states, in order."""
  leaves = jax.tree.leaves(opt_state, is_leaf=ema_jax._state.is_state)
  return [x for x in leaves if not ema_jax._state.is_state(x)]


@pytest.mark.parametrize("name", WRAPPERS)
def test_linen_checkpoints_round_trip_inside_wrappers(tmp_path, name):
  state = trained(with_ema(WRAPPERS[name]))
  ema = ema_jax.ema_params(state.opt_state)
  assert not jnp.array_equal(ema["w"], state.params["w"])
  # Leaves the EMA does not see (multi_transform's "y") are exported as they are.
  assert_bitwise_equal(
      ema_jax.flax.export_ema(state)["params"],
      jax.tree.map(lambda e, p: p if e is None else e, ema, state.params,
                   is_leaf=lambda x: x is None),
  )
  template = trained(with_ema(WRAPPERS[name]), 0)
  save(tmp_path / "raw", state)
  restored = restore(tmp_path / "raw", template)
  assert_bitwise_equal((restored.params, restored.opt_state), (state.params, state.opt_state))
  swapped = ema_jax.flax.SwapEMAWeights().on_test_begin(state)
  assert_bitwise_equal(swapped.params, ema_jax.flax.export_ema(state)["params"])
  save(tmp_path / "swapped", swapped)
  restored = restore(tmp_path / "swapped", template)
  assert_bitwise_equal((restored.params, restored.opt_state), (state.params, state.opt_state))


@pytest.mark.parametrize("name", WRAPPERS)
def test_linen_enabling_ema_inside_wrappers(tmp_path, name):
  before = trained(WRAPPERS[name](INNER()))
  save(tmp_path, before)
  template = trained(with_ema(WRAPPERS[name]), 0)
  with pytest.raises(ValueError, match=r'has no EMA state.*missing_ema="init"'):
    restore(tmp_path, template)
  restored = restore(tmp_path, template, missing_ema="init")
  assert_bitwise_equal(restored.params, before.params)
  assert_bitwise_equal(not_ema(restored.opt_state), jax.tree.leaves(before.opt_state))
  _, ema_state = ema_jax._state.find(restored.opt_state, None)
  assert int(ema_state.count) == 0
  for name_, e in ema_jax.ema_params(restored.opt_state).items():
    assert e is None or bool(jnp.array_equal(e, before.params[name_])), name_
  restored.apply_gradients(grads=GRADS)  # and it trains on


@pytest.mark.parametrize("name", ["MultiSteps", "apply_if_finite", "masked", "multi_transform"])
def test_nnx_enabling_ema_inside_wrappers(tmp_path, name):
  wrap = WRAPPERS[name]
  if name == "multi_transform":  # one label: NNX params are a State, not a dict
    wrap = lambda inner: optax.multi_transform(  # noqa: E731
        {"x": inner}, lambda p: jax.tree.map(lambda _: "x", p))
  model, optimizer = nnx_pair(wrap(INNER()), 0)
  nnx_train(model, optimizer, 3)
  want_model = jax.tree.map(jnp.copy, nnx.state(model))
  want_opt = jax.tree.leaves(jax.tree.map(jnp.copy, nnx.as_pure(optimizer.opt_state)))
  with ocp.CheckpointManager(tmp_path) as manager:
    ema_jax.flax.save_checkpoint(manager, 3, model, optimizer)
    manager.wait_until_finished()
  model, optimizer = nnx_pair(wrap(optax.chain(INNER(), ema_jax.ema(0.5))), 1)
  with ocp.CheckpointManager(tmp_path) as manager:
    with pytest.raises(ValueError, match=r'has no EMA state.*missing_ema="init"'):
      ema_jax.flax.restore_checkpoint(manager, model, optimizer)
    ema_jax.flax.restore_checkpoint(manager, model, optimizer, missing_ema="init")
  assert_bitwise_equal(nnx.state(model), want_model)
  opt_state = nnx.as_pure(optimizer.opt_state)
  assert_bitwise_equal(not_ema(opt_state), want_opt)
  _, ema_state = ema_jax._state.find(opt_state, None)
  assert int(ema_state.count) == 0
  assert_bitwise_equal(ema_state.ema, nnx.as_pure(nnx.state(model, nnx.Param)))
  nnx_train(model, optimizer, 1)  # and it trains on
