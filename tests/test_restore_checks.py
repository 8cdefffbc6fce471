"""`restore_checkpoint` checks the checkpoint against the template, by name.

Every mismatch is refused before Orbax reads an array, naming the EMA setting
or the leaf; abstract templates work for every state kind; a checkpoint of a
run without EMA resumes into a chain with one (`missing_ema="init"`).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training.train_state import TrainState

import ema_jax
import ema_jax.flax
from _util import assert_bitwise_equal

PARAMS = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([1.0, -2.0, 0.5])}
GRADS = {"w": jnp.full((2, 3), 0.25), "b": jnp.array([0.5, -0.5, 1.0])}


def trained(tx, steps=3, params=PARAMS):
  state = TrainState.create(apply_fn=None, params=params, tx=tx)
  for _ in range(steps):
    state = state.apply_gradients(grads=GRADS)
  return state


def save(path, state, step=3):
  with ocp.CheckpointManager(path) as manager:
    assert ema_jax.flax.save_checkpoint(manager, step, state)
    manager.wait_until_finished()


def restore(path, template, **kw):
  with ocp.CheckpointManager(path) as manager:
    return ema_jax.flax.restore_checkpoint(manager, template, **kw)


def abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.Array) else x,
      tree,
  )


def refused(path, template, *needles):
  with pytest.raises(ValueError) as info:
    restore(path, template)
  message = str(info.value)
  for needle in needles:
    assert needle in message, message
  # Never Orbax's hints, which would load the wrong thing.
  assert not re.search("strict|partial_restore", message), message
  assert "nothing was restored" in message or "missing_ema" in message
  return message


# ------------------------------------------------- settings and leaves by name

CASES = {
    "debias": (
        dict(), dict(debias=True),
        ["debias=False", "debias=True", "opt_state.1"]),
    "debias-dropped": (
        dict(debias=True), dict(),
        ["checkpoint was written with debias=True", "debias=True."]),
    "ema_dtype": (
        dict(), dict(ema_dtype=jnp.bfloat16),
        ["float32", "bfloat16", "ema_dtype=jnp.float32", "never casts"]),
    "rounding": (
        dict(ema_dtype=jnp.bfloat16, rounding="stochastic", key=0),
        dict(ema_dtype=jnp.bfloat16),
        ["rounding='stochastic'", "rounding='nearest'"]),
    "mask": (
        dict(mask={"w": True, "b": False}), dict(),
        ["leaf `b` is averaged in the template but not in the checkpoint", "mask"]),
}


@pytest.mark.standard_promotion  # optax's adam is not strict-clean
@pytest.mark.parametrize("case", CASES)
def test_an_ema_setting_that_differs_is_named(tmp_path, case):
  saved_kw, template_kw, needles = CASES[case]
  save(tmp_path, trained(optax.chain(optax.adam(0.1), ema_jax.ema(0.9, **saved_kw))))
  template = trained(optax.chain(optax.adam(0.1), ema_jax.ema(0.9, **template_kw)), 0)
  refused(tmp_path, template, *needles)
  refused(tmp_path, abstract(template), *needles)


@pytest.mark.standard_promotion
def test_the_number_of_averages_is_named(tmp_path):
  save(tmp_path, trained(optax.chain(optax.adam(0.1), ema_jax.multi_ema([0.9, 0.99]))))
  template = trained(optax.chain(optax.adam(0.1), ema_jax.multi_ema([0.9, 0.99, 0.999])), 0)
  refused(tmp_path, template, "2 averages", "`multi_ema` 3")


@pytest.mark.standard_promotion
def test_a_wrong_shape_names_the_leaf(tmp_path):
  tx = optax.chain(optax.adam(0.1), ema_jax.ema(0.9))
  save(tmp_path, trained(tx))
  bigger = dict(PARAMS, w=jnp.zeros((3, 3)))
  message = refused(tmp_path, trained(tx, 0, bigger), "`params.w`: float32[2, 3] in "
                    "the checkpoint, float32[3, 3] in the template")
  assert "opt_state.1.ema.w" in message  # every leaf of that shape is listed


@pytest.mark.standard_promotion
def test_another_optimizer_is_named(tmp_path):
  save(tmp_path, trained(optax.chain(optax.adam(0.1), ema_jax.ema(0.9))))
  refused(tmp_path, trained(optax.chain(optax.sgd(0.1), ema_jax.ema(0.9)), 0),
          "opt_state.0.0.mu.w` is in the checkpoint but not the template")


# ------------------------------------------------- abstract templates, any kind

KINDS = {
    "single": lambda: ema_jax.ema(0.9),
    "debias": lambda: ema_jax.ema(0.9, debias=True),
    "multi": lambda: ema_jax.multi_ema([0.5, 0.9], debias=True),
    "masked-multi": lambda: optax.masked(ema_jax.multi_ema([0.5, 0.9]), {"w": True, "b": False}),
    "offloaded": lambda: ema_jax.ema(0.9, memory_kind="pinned_host"),
    "stochastic": lambda: ema_jax.ema(0.9, ema_dtype=jnp.bfloat16, rounding="stochastic", key=3),
}


@pytest.mark.standard_promotion
@pytest.mark.parametrize("swapped", [False, True], ids=["raw", "swapped"])
@pytest.mark.parametrize("kind", KINDS)
def test_abstract_linen_templates_restore_every_state_kind(tmp_path, kind, swapped):
  tx = optax.chain(optax.adam(0.1), KINDS[kind]())
  state = trained(tx)
  written = state
  if swapped:
    index = 1 if "multi" in kind else None
    written = ema_jax.flax.SwapEMAWeights(index=index).on_test_begin(state)
  save(tmp_path, written)
  template = abstract(trained(tx, 0, jax.tree.map(lambda x: x + 7, PARAMS)))
  restored = restore(tmp_path, template)
  assert not ema_jax.flax.is_swapped(restored)
  assert restored.step == 3
  assert_bitwise_equal(restored.params, state.params)
  assert_bitwise_equal(restored.opt_state, state.opt_state)
  for got, want in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
    assert got.sharding == want.sharding  # the EMA stays in host memory
  # and it trains on exactly as the uninterrupted run
  assert_bitwise_equal(
      restored.apply_gradients(grads=GRADS).opt_state,
      state.apply_gradients(grads=GRADS).opt_state,
  )


class Small(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.dense(x))


def nnx_pair(tx, seed, average_stats=None):
  model = Small(nnx.Rngs(seed))
  optimizer = ema_jax.flax.Optimizer(model, tx, wrt=nnx.Param, average_stats=average_stats)
  return model, optimizer


def nnx_train(model, optimizer, steps):
  for i in range(steps):
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3) * (i + 1)
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("swapped", [False, True], ids=["raw", "swapped"])
def test_a_template_without_shardings_reads_the_metadata_once(tmp_path, monkeypatch, swapped):
  # `jax.eval_shape` gives leaves without a sharding: they come back with the
  # saved ones, taken from the metadata the checks read (Orbax would read the
  # whole checkpoint's metadata again to find them: seconds at 10,000 leaves).
  tx = optax.chain(optax.adam(0.1), ema_jax.ema(0.9))
  state = trained(tx)
  save(tmp_path, ema_jax.flax.SwapEMAWeights().on_test_begin(state) if swapped else state)
  template = jax.eval_shape(lambda: trained(tx, 0))
  assert all(getattr(x, "sharding", None) is None for x in jax.tree.leaves(template))
  reads = []
  metadata = ocp.StandardCheckpointHandler.metadata
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "metadata",
                      lambda self, d: reads.append(d) or metadata(self, d))
  restored = restore(tmp_path, template)
  assert len(reads) == 1
  assert restored.step == 3 and isinstance(restored.step, np.ndarray)  # as Orbax gives it
  assert_bitwise_equal(restored.params, state.params)
  assert_bitwise_equal(restored.opt_state, state.opt_state)
  for got, want in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
    assert got.sharding == want.sharding


@pytest.mark.standard_promotion
@pytest.mark.parametrize("swapped", [False, True], ids=["raw", "swapped"])
@pytest.mark.parametrize("kind", ["single", "multi", "stochastic", "offloaded"])
def test_abstract_nnx_templates_restore_every_state_kind(tmp_path, kind, swapped):
  ema = KINDS[kind]()
  tx = optax.chain(optax.adam(0.1), ema)
  stats_ema = None if kind == "multi" else ema
  model, optimizer = nnx_pair(tx, 0, stats_ema)
  nnx_train(model, optimizer, 3)
  # A copy: the States hold the model's Variables, which the swap changes.
  want = jax.tree.map(jnp.copy, (nnx.state(model), nnx.state(optimizer)))
  if swapped:
    index = 1 if kind == "multi" else None
    ema_jax.flax.SwapEMAWeights(index=index).on_test_begin(model, optimizer)
  with ocp.CheckpointManager(tmp_path) as manager:
    ema_jax.flax.save_checkpoint(manager, 3, model, optimizer)
    manager.wait_until_finished()

  model, optimizer = nnx.eval_shape(lambda: nnx_pair(tx, 1, stats_ema))
  with ocp.CheckpointManager(tmp_path) as manager:
    assert ema_jax.flax.restore_checkpoint(manager, model, optimizer) is None
  assert not ema_jax.flax.is_swapped(optimizer)
  assert_bitwise_equal(nnx.state(model), want[0])
  assert_bitwise_equal(nnx.state(optimizer), want[1])


# ------------------------------------------------------- enabling EMA mid-run

INNER = optax.chain(optax.add_noise(0.01, 0.55, 0), optax.adam(0.1))


@pytest.mark.standard_promotion
@pytest.mark.parametrize("ema", [
    ema_jax.ema(0.9),
    ema_jax.multi_ema([0.5, 0.9], debias=True),
    optax.masked(ema_jax.ema(0.9), {"w": True, "b": False}),
], ids=["ema", "multi_ema", "masked"])
def test_linen_enabling_ema_mid_run(tmp_path, ema):
  before = trained(INNER)
  save(tmp_path, before)
  template = trained(optax.chain(INNER, ema), 0, jax.tree.map(jnp.zeros_like, PARAMS))
  message = refused(tmp_path, template, 'missing_ema="init"', "no EMA state")
  assert "nothing was restored" not in message

  for t in (template, abstract(template)):
    restored = restore(tmp_path, t, missing_ema="init")
    assert restored.step == 3
    assert_bitwise_equal(restored.params, before.params)
    assert_bitwise_equal(restored.opt_state[0], before.opt_state)
    state = restored.opt_state[1]
    state = getattr(state, "inner_state", state)  # under optax.masked
    assert int(state.count) == 0
    for index in range(ema_jax._state.num_averages(state)):
      averages = ema_jax.ema_params(
          restored.opt_state, index=index if isinstance(state, ema_jax.MultiEmaState) else None)
      assert_bitwise_equal(averages["w"], before.params["w"])
      assert averages["b"] is None or np.array_equal(averages["b"], before.params["b"])
    # and it trains on: the first update averages from the restored params
    after = restored.apply_gradients(grads=GRADS)
    assert int(getattr(after.opt_state[1], "inner_state", after.opt_state[1]).count) == 1


@pytest.mark.standard_promotion
def test_nnx_enabling_ema_mid_run(tmp_path):
  model, optimizer = nnx_pair(INNER, 0)
  nnx_train(model, optimizer, 3)
  want_model, want_opt = jax.tree.map(jnp.copy, (nnx.state(model), nnx.state(optimizer)))
  with ocp.CheckpointManager(tmp_path) as manager:
    ema_jax.flax.save_checkpoint(manager, 3, model, optimizer)
    manager.wait_until_finished()

  ema = ema_jax.ema(0.9)
  model, optimizer = nnx_pair(optax.chain(INNER, ema), 1, average_stats=ema)
  with ocp.CheckpointManager(tmp_path) as manager:
    with pytest.raises(ValueError, match='missing_ema="init"'):
      ema_jax.flax.restore_checkpoint(manager, model, optimizer)
    ema_jax.flax.restore_checkpoint(manager, model, optimizer, missing_ema="init")
  assert_bitwise_equal(nnx.state(model), want_model)
  assert int(optimizer.step[...]) == 3
  assert_bitwise_equal(  # the inner optimizer's state, leaf by leaf
      jax.tree.leaves(nnx.as_pure(optimizer.opt_state)[0]),
      jax.tree.leaves(nnx.as_pure(want_opt["opt_state"])),
  )
  state = nnx.as_pure(optimizer.opt_state)[1]
  assert int(state.count) == 0
  assert_bitwise_equal(state.ema, nnx.as_pure(nnx.state(model, nnx.Param)))
  stats = nnx.as_pure(optimizer.stats_ema)
  assert int(stats.count) == 0
  assert_bitwise_equal(stats.ema, nnx.as_pure(nnx.state(model, nnx.BatchStat)))
  nnx_train(model, optimizer, 1)  # and it trains on
  assert int(nnx.as_pure(optimizer.opt_state)[1].count) == 1


def test_missing_ema_is_checked(tmp_path):
  save(tmp_path, trained(ema_jax.ema(0.9)))
  with pytest.raises(ValueError, match="missing_ema"):
    restore(tmp_path, trained(ema_jax.ema(0.9), 0), missing_ema="yes")
