"""Where the EMA meets the rest of JAX: cached NNX graphs, traced and vmapped
hyperparameters, offload in the hook, complex params, and the errors that must
come early and by name (issue 18)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import ema_jax
import ema_jax.flax
from _util import assert_bitwise_equal


# ------------------------------------------- training while swapped is refused


def _nnx_setup():
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  tx = optax.chain(optax.adam(0.1), ema_jax.ema(0.9))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _nnx_loss(model, x):
  return (model(x) ** 2).mean()


def _snapshot(model, optimizer):
  return jax.tree.map(
      np.asarray, nnx.as_pure(nnx.state((model, optimizer)))
  )


def _nnx_patterns():
  """name -> factory(model, optimizer) -> step(x); each step trains once."""

  def plain(model, optimizer):
    @nnx.jit
    def step(model, optimizer, x):
      optimizer.update(model, nnx.grad(_nnx_loss)(model, x))

    return lambda x: step(model, optimizer, x)

  def cached(model, optimizer):
    @nnx.jit
    def step(model, optimizer, x):
      optimizer.update(model, nnx.grad(_nnx_loss)(model, x))

    with nnx.set_graph_mode(True), nnx.set_graph_updates(True):
      return nnx.cached_partial(step, model, optimizer)

  @jax.jit
  def split_step(graphdef, state, x):
    m, o = nnx.merge(graphdef, state)
    o.update(m, nnx.grad(_nnx_loss)(m, x))
    return nnx.state((m, o))

  def split(model, optimizer):
    def run(x):
      graphdef, state = nnx.split((model, optimizer))
      nnx.update((model, optimizer), split_step(graphdef, state, x))

    return run

  def stale_split(model, optimizer):
    # The graphdef is taken once, before training, and reused: Flax itself
    # refuses the swapped state's extra leaves (the held raw params).
    graphdef, _ = nnx.split((model, optimizer))

    def run(x):
      state = nnx.state((model, optimizer))
      nnx.update((model, optimizer), split_step(graphdef, state, x))

    return run

  def eager(model, optimizer):
    return lambda x: optimizer.update(model, nnx.grad(_nnx_loss)(model, x))

  return {"nnx.jit": plain, "nnx.cached_partial": cached,
          "nnx.split+jax.jit": split, "stale graphdef": stale_split,
          "eager": eager}


@pytest.mark.standard_promotion  # optax.adam's int32 step counts
@pytest.mark.parametrize("pattern", list(_nnx_patterns()))
@pytest.mark.parametrize("swap_with", ["hook", "ema_weights"])
def test_nnx_training_while_swapped_is_refused(pattern, swap_with):
  x = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  model, optimizer = _nnx_setup()
  step = _nnx_patterns()[pattern](model, optimizer)
  clean_model, clean_optimizer = _nnx_setup()
  clean_step = _nnx_patterns()[pattern](clean_model, clean_optimizer)
  for _ in range(5):
    step(x)
    clean_step(x)

  hook = ema_jax.flax.SwapEMAWeights()
  if swap_with == "hook":
    hook.on_test_begin(model, optimizer)
  else:
    context = ema_jax.flax.ema_weights(model, optimizer)
    context.__enter__()
  before = _snapshot(model, optimizer)
  refusal = "Incorrect number of leaves" if pattern == "stale graphdef" else "swapped"
  with pytest.raises(ValueError, match=refusal):
    step(x)
  # The refused call changed nothing: params (the EMA, swapped in), the
  # optimizer's step, Adam's moments, the EMA and its count.
  assert_bitwise_equal(_snapshot(model, optimizer), before)
  if swap_with == "hook":
    hook.on_test_end(model, optimizer)
  else:
    context.__exit__(None, None, None)

  for _ in range(3):
    step(x)
    clean_step(x)
  assert_bitwise_equal(
      _snapshot(model, optimizer), _snapshot(clean_model, clean_optimizer)
  )
  assert int(optimizer.opt_state[1].count[...]) == 8


def test_linen_and_optax_training_while_swapped_is_refused():
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))
  params = {"w": jnp.array([1.0, 2.0])}
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  swapped = ema_jax.flax.SwapEMAWeights().on_test_begin(state)
  grads = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="swapped"):
    jax.jit(lambda s: s.apply_gradients(grads=grads))(swapped)
  opt_state = tx.init(params)
  ema_weights, swapped_state = ema_jax.swap(params, opt_state)
  with pytest.raises(ValueError, match="swapped"):
    jax.jit(tx.update)(grads, swapped_state, ema_weights)
  # The count of a swapped state comes back as it was, scalar, bit for bit.
  back, unswapped = ema_jax.swap(ema_weights, swapped_state)
  assert_bitwise_equal((back, unswapped), (params, opt_state))
