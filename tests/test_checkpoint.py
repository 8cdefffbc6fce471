"""Orbax checkpoints: bit-exact resume, swapped checkpoints, and the EMA export."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import ema_jax
from _util import assert_bitwise_equal
import ema_jax.flax

N_STEPS = 9
STOP_AT = 4  # the interrupted run saves here and a new process would resume


def assert_bitwise(a, b):
  assert jax.tree.leaves(a)  # an empty comparison proves nothing
  assert_bitwise_equal(a, b)


def batch(step):
  key = jax.random.fold_in(jax.random.key(42), step)
  return jax.random.normal(key, (8, 3))


# ------------------------------------------------------------------- Linen


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Dense(5)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.7)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(2)(x)


LINEN_EMA = ema_jax.ema(
    ema_jax.warmup_decay(0.99, power=0.75), start_step=2, update_every=2
)
LINEN_TX = optax.chain(
    optax.add_noise(0.01, 0.55, 0),  # its RNG state must resume too
    optax.adam(1e-2),
    LINEN_EMA,
)


LINEN_MODEL = LinenNet()


@functools.cache  # states are immutable; initialising is the slow part
def linen_state(seed):
  variables = jax.jit(LINEN_MODEL.init, static_argnames="train")(
      jax.random.key(seed), batch(0), train=False
  )
  state = ema_jax.flax.TrainState.create(
      apply_fn=LINEN_MODEL.apply,
      params=variables["params"],
      tx=LINEN_TX,
      batch_stats=variables["batch_stats"],
      average_stats=LINEN_EMA,
  )
  # Committed arrays and an int32 step, as restored states have: then the
  # train step compiles once for all the runs of this module.
  state = state.replace(step=jnp.zeros((), jnp.int32))
  return jax.device_put(state, jax.devices()[0])


@jax.jit
def linen_step(state):
  x = batch(state.step)
  dropout = jax.random.fold_in(jax.random.key(7), state.step)

  def loss(params):
    y, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        rngs={"dropout": dropout},
        mutable=["batch_stats"],
    )
    return jnp.mean((y - 1.0) ** 2), updates["batch_stats"]

  grads, stats = jax.grad(loss, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=stats)


def linen_train(state, steps):
  for _ in range(steps):
    state = linen_step(state)
  return state


@pytest.fixture(scope="module")
def linen_uninterrupted():
  return linen_train(linen_state(0), N_STEPS)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("swapped", [False, True], ids=["raw", "ema-swapped-in"])
def test_linen_resume_is_bitwise(tmp_path, linen_uninterrupted, swapped):
  state = linen_train(linen_state(0), STOP_AT)
  if swapped:  # as with swap_on_epoch=True: the checkpoint holds EMA params
    state = ema_jax.flax.SwapEMAWeights(swap_on_epoch=True).on_epoch_end(state)
    assert ema_jax.flax.is_swapped(state)
  with ocp.CheckpointManager(tmp_path) as manager:
    assert ema_jax.flax.save_checkpoint(manager, STOP_AT, state)
    manager.wait_until_finished()

  # A new process: fresh (different) values, and an abstract template.
  template = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      linen_state(1),
  )
  with ocp.CheckpointManager(tmp_path) as manager:
    restored = ema_jax.flax.restore_checkpoint(manager, template)
  assert not ema_jax.flax.is_swapped(restored)
  assert int(restored.step) == STOP_AT
  assert int(restored.opt_state[2].count) == STOP_AT
  resumed = linen_train(restored, N_STEPS - STOP_AT)

  assert_bitwise(resumed.params, linen_uninterrupted.params)
  assert_bitwise(resumed.opt_state, linen_uninterrupted.opt_state)
  assert_bitwise(resumed.batch_stats, linen_uninterrupted.batch_stats)
  assert_bitwise(resumed.stats_ema, linen_uninterrupted.stats_ema)
  assert int(resumed.step) == N_STEPS
  # The EMA did move away from the params (the comparison is not vacuous).
  ema = ema_jax.ema_params(resumed.opt_state)
  assert not np.array_equal(ema["Dense_0"]["kernel"], resumed.params["Dense_0"]["kernel"])


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_linen_swapped_checkpoint_does_not_restore_as_training_state(tmp_path):
  state = linen_train(linen_state(0), 2)
  swapped = ema_jax.flax.SwapEMAWeights().on_test_begin(state)
  with ocp.CheckpointManager(tmp_path) as manager:
    ema_jax.flax.save_checkpoint(manager, 2, swapped)
    manager.wait_until_finished()
    # Plain Orbax into a training template: the `ema` / `raw_params` keys
    # differ, so it refuses instead of loading the EMA as training weights.
    with pytest.raises(ValueError, match="raw_params"):
      manager.restore(2, args=ocp.args.StandardRestore(linen_state(1)))
    restored = ema_jax.flax.restore_checkpoint(manager, linen_state(1), step=2)
  assert_bitwise(restored.params, state.params)
  assert_bitwise(restored.opt_state, state.opt_state)


def test_restore_without_checkpoint(tmp_path):
  with ocp.CheckpointManager(tmp_path) as manager:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
      ema_jax.flax.restore_checkpoint(manager, linen_state(0))


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_linen_export(tmp_path):
  state = linen_train(linen_state(0), 3)
  exported = ema_jax.flax.export_ema(state, directory=tmp_path / "ema")
  assert set(exported) == {"params", "batch_stats"}
  assert_bitwise(exported["params"], ema_jax.ema_params(state.opt_state))
  assert_bitwise(exported["batch_stats"], state.stats_ema.ema)
  # A copy: donating the training state later cannot delete it.
  ema_leaf = jax.tree.leaves(ema_jax.ema_params(state.opt_state))[0]
  assert jax.tree.leaves(exported["params"])[0] is not ema_leaf
  with ocp.StandardCheckpointer() as checkpointer:
    loaded = checkpointer.restore(tmp_path / "ema", exported)
  assert_bitwise(loaded, exported)
  # It is what evaluation under the hook sees.
  ema_in = ema_jax.flax.SwapEMAWeights().on_test_begin(state)
  y_hook = ema_in.apply_fn(
      {"params": ema_in.params, "batch_stats": ema_in.batch_stats}, batch(0), train=False
  )
  assert_bitwise(state.apply_fn(loaded, batch(0), train=False), y_hook)


# --------------------------------------------------------------------- NNX


class Net(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 5, rngs=rngs)
    self.norm = nnx.BatchNorm(5, momentum=0.7, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.out = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.norm(self.dense(x)))))


NNX_EMA = ema_jax.ema(ema_jax.power_decay(sigma_rel=0.2), debias=True)
NNX_TX = optax.chain(optax.add_noise(0.01, 0.55, 0), optax.adam(1e-2), NNX_EMA)


def nnx_setup(seed):
  model = Net(nnx.Rngs(seed, dropout=seed + 1))
  optimizer = ema_jax.flax.Optimizer(
      model, NNX_TX, wrt=nnx.Param, average_stats=NNX_EMA
  )
  # Committed arrays, as restored ones are: `nnx_step` compiles only once.
  for node in (model, optimizer):
    nnx.update(node, jax.device_put(nnx.state(node), jax.devices()[0]))
  return model, optimizer


@nnx.jit
def nnx_step(model, optimizer, x):
  grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
  optimizer.update(model, grads)


def nnx_train(model, optimizer, start, stop):
  for step in range(start, stop):
    nnx_step(model, optimizer, batch(step))


@pytest.fixture(scope="module")
def nnx_uninterrupted():
  model, optimizer = nnx_setup(0)
  nnx_train(model, optimizer, 0, N_STEPS)
  return nnx.state(model), nnx.state(optimizer)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("swapped", [False, True], ids=["raw", "ema-swapped-in"])
def test_nnx_resume_is_bitwise(tmp_path, nnx_uninterrupted, swapped):
  model, optimizer = nnx_setup(0)
  nnx_train(model, optimizer, 0, STOP_AT)
  if swapped:
    ema_jax.flax.SwapEMAWeights(swap_on_epoch=True).on_epoch_end(model, optimizer)
  with ocp.CheckpointManager(tmp_path) as manager:
    ema_jax.flax.save_checkpoint(manager, STOP_AT, model, optimizer)
    manager.wait_until_finished()

  model, optimizer = nnx_setup(5)  # a new process, other initial values
  with ocp.CheckpointManager(tmp_path) as manager:
    if swapped:
      with pytest.raises(ValueError, match="raw_params"):
        manager.restore(
            STOP_AT,
            args=ocp.args.StandardRestore(
                {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
            ),
        )
    assert ema_jax.flax.restore_checkpoint(manager, model, optimizer) is None
  assert not ema_jax.flax.is_swapped(optimizer)
  assert int(optimizer.step[...]) == STOP_AT
  nnx_train(model, optimizer, STOP_AT, N_STEPS)

  model_state, optimizer_state = nnx_uninterrupted
  assert_bitwise(nnx.state(model), model_state)  # params, statistics, RNG streams
  assert_bitwise(nnx.state(optimizer), optimizer_state)  # EMA, counts, debias
  assert int(optimizer.opt_state[2].count[...]) == N_STEPS


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_nnx_export(tmp_path):
  model, optimizer = nnx_setup(0)
  nnx_train(model, optimizer, 0, 3)
  before = nnx.state(model)
  exported = ema_jax.flax.export_ema(model, optimizer, directory=tmp_path / "ema")
  assert isinstance(exported, Net) and exported is not model
  assert_bitwise(nnx.state(model), before)  # the training model is untouched
  assert_bitwise(
      nnx.as_pure(nnx.state(exported, nnx.Param)),
      ema_jax.ema_params(nnx.as_pure(optimizer.opt_state)),
  )
  assert_bitwise(
      nnx.as_pure(nnx.state(exported, nnx.BatchStat)),
      ema_jax.ema_params(nnx.as_pure(optimizer.stats_ema)),
  )
  fresh, _ = nnx_setup(9)
  with ocp.StandardCheckpointer() as checkpointer:
    nnx.update(fresh, checkpointer.restore(tmp_path / "ema", nnx.state(fresh)))
  fresh.eval()
  exported.eval()
  with ema_jax.flax.ema_weights(model, optimizer):
    model.eval()
    y_hook = model(batch(0))
  assert_bitwise(fresh(batch(0)), y_hook)
  assert_bitwise(exported(batch(0)), y_hook)


# ------------------------------------------------------- multi-EMA states


def multi_tx(tmp_path):
  # The post-hoc tracker's two power EMAs, as the optimizer's only EMA.
  tracker = ema_jax.posthoc.Snapshotter(tmp_path / "snapshots", every=100)
  return optax.chain(optax.adam(1e-2), tracker.ema())


def multi_linen_state(tx, seed):
  from flax.training import train_state

  variables = LINEN_MODEL.init(jax.random.key(seed), batch(0), train=False)
  state = train_state.TrainState.create(
      apply_fn=LINEN_MODEL.apply, params=variables["params"], tx=tx
  )
  return state.replace(step=jnp.zeros((), jnp.int32)), variables["batch_stats"]


@functools.partial(jax.jit, static_argnames="steps")
def multi_linen_train(state, batch_stats, steps):
  def loss(params, x):
    y = state.apply_fn(
        {"params": params, "batch_stats": batch_stats}, x, train=False
    )
    return jnp.mean((y - 1.0) ** 2)

  for _ in range(steps):
    state = state.apply_gradients(grads=jax.grad(loss)(state.params, batch(state.step)))
  return state


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("swapped", [False, True], ids=["raw", "average-1-swapped-in"])
def test_linen_multi_ema_resume_is_bitwise(tmp_path, swapped):
  tx = multi_tx(tmp_path)
  state, stats = multi_linen_state(tx, 0)
  uninterrupted = multi_linen_train(state, stats, N_STEPS)
  state = multi_linen_train(state, stats, STOP_AT)
  if swapped:
    with pytest.raises(ValueError, match="pass `index=i`"):
      ema_jax.flax.SwapEMAWeights(swap_on_epoch=True).on_epoch_end(state)
    state = ema_jax.flax.SwapEMAWeights(swap_on_epoch=True, index=1).on_epoch_end(state)
    assert ema_jax.flax.is_swapped(state)
    assert int(state.opt_state[1].index) == 1
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert ema_jax.flax.save_checkpoint(manager, STOP_AT, state)
    manager.wait_until_finished()

  template, _ = multi_linen_state(tx, 1)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = ema_jax.flax.restore_checkpoint(manager, template)
  assert not ema_jax.flax.is_swapped(restored)
  assert type(restored.opt_state[1]) is ema_jax.MultiEmaState
  assert int(restored.opt_state[1].count) == STOP_AT
  resumed = multi_linen_train(restored, stats, N_STEPS - STOP_AT)

  assert_bitwise(resumed.params, uninterrupted.params)
  assert_bitwise(resumed.opt_state, uninterrupted.opt_state)
  averages = [ema_jax.ema_params(resumed.opt_state, index=i) for i in range(2)]
  kernel = resumed.params["Dense_0"]["kernel"]
  assert not np.array_equal(averages[0]["Dense_0"]["kernel"], kernel)
  assert not np.array_equal(averages[0]["Dense_0"]["kernel"], averages[1]["Dense_0"]["kernel"])


class SmallNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.dense(x)))


MULTI_NNX_TX = optax.chain(optax.adam(1e-2), ema_jax.multi_ema([0.5, 0.9]))


def multi_nnx_setup(seed):
  model = SmallNet(nnx.Rngs(seed))
  return model, nnx.Optimizer(model, MULTI_NNX_TX, wrt=nnx.Param)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("swapped", [False, True], ids=["raw", "average-1-swapped-in"])
def test_nnx_multi_ema_resume_is_bitwise(tmp_path, swapped):
  model, optimizer = multi_nnx_setup(0)
  nnx_train(model, optimizer, 0, N_STEPS)
  uninterrupted = nnx.state(model), nnx.state(optimizer)

  model, optimizer = multi_nnx_setup(0)
  nnx_train(model, optimizer, 0, STOP_AT)
  if swapped:
    ema_jax.flax.SwapEMAWeights(swap_on_epoch=True, index=1).on_epoch_end(model, optimizer)
    assert ema_jax.flax.is_swapped(optimizer)
  with ocp.CheckpointManager(tmp_path) as manager:
    ema_jax.flax.save_checkpoint(manager, STOP_AT, model, optimizer)
    manager.wait_until_finished()

  model, optimizer = multi_nnx_setup(5)
  with ocp.CheckpointManager(tmp_path) as manager:
    assert ema_jax.flax.restore_checkpoint(manager, model, optimizer) is None
  assert not ema_jax.flax.is_swapped(optimizer)
  assert int(optimizer.opt_state[1].count[...]) == STOP_AT
  nnx_train(model, optimizer, STOP_AT, N_STEPS)

  model_state, optimizer_state = uninterrupted
  assert_bitwise(nnx.state(model), model_state)
  assert_bitwise(nnx.state(optimizer), optimizer_state)
  averages = [ema_jax.ema_params(nnx.as_pure(optimizer.opt_state), index=i) for i in range(2)]
  assert not np.array_equal(averages[0]["dense"]["kernel"], averages[1]["dense"]["kernel"])
