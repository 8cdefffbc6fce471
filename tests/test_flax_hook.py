"""The Flax hook against Keras 3's `SwapEMAWeights`, for Linen and NNX."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import ema_jax
from _util import assert_bitwise_equal, bits
import ema_jax.flax

# Keras' own swap converts its variables with np.array (a numpy 2 warning).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)

EVENTS = (
    "on_epoch_begin",
    "on_epoch_end",
    "on_test_begin",
    "on_test_end",
    "on_predict_begin",
    "on_predict_end",
)


def assert_bitwise(a, b):
  assert jax.tree.leaves(a)  # an empty comparison proves nothing
  assert_bitwise_equal(a, b)


# ---------------------------------------------------------------- import guard


def test_import_ema_jax_without_flax():
  code = textwrap.dedent(
      """
      import importlib.abc, sys

      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("flax", "orbax"):
            raise ImportError(f"blocked {name}")
          return None

      sys.meta_path.insert(0, Block())
      import jax.numpy as jnp, optax, ema_jax
      tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.5))
      state = tx.init(jnp.zeros(1))
      _, state = tx.update(jnp.ones(1), state, jnp.zeros(1))
      assert float(ema_jax.ema_params(state)[0]) == -0.5
      assert not any(m.split(".")[0] in ("flax", "orbax") for m in sys.modules)
      try:
        import ema_jax.flax
      except ImportError as e:
        assert "pip install 'ema_jax[flax]'" in str(e), e
        print("ok")
      """
  )
  out = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "ok"


# ------------------------------------------------------- Keras as the reference


class Labeller:
  """Says whether a model holds the raw weights or the EMA (values differ)."""

  def __init__(self, raw, ema):
    self.raw = [bits(x) for x in jax.tree.leaves(raw)]
    self.ema = [bits(x) for x in jax.tree.leaves(ema)]
    assert all(r != e for r, e in zip(self.raw, self.ema))

  def __call__(self, weights):
    got = [bits(x) for x in jax.tree.leaves(weights)]
    if got == self.raw:
      return "raw"
    if got == self.ema:
      return "ema"
    return "corrupt"


@pytest.fixture(scope="module")
def keras_reference():
  keras = pytest.importorskip("keras")
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(
      optimizer=keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5),
      loss="mse",
  )
  x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  y = np.array([[1.0], [0.0]], np.float32)
  for _ in range(2):
    model.train_on_batch(x, y)
  averages = model.optimizer._model_variables_moving_average
  raw = [np.asarray(v.value) for v in model.trainable_variables]
  ema = [np.asarray(v.value) for v in averages]
  label = Labeller(raw, ema)

  class FixedPredict(keras.callbacks.SwapEMAWeights):
    # Keras 3.15 never swaps back after predict (its condition is inverted);
    # this is the documented intent, which our hook follows.
    def on_predict_end(self, logs=None):
      if self._ema_weights_in_model:
        self._swap_variables()
        self._ema_weights_in_model = False

  def run(events, swap_on_epoch, callback_cls=FixedPredict):
    for v, r in zip(model.trainable_variables, raw):
      v.assign(r)
    for a, e in zip(averages, ema):
      a.assign(e)
    callback = callback_cls(swap_on_epoch=swap_on_epoch)
    callback.set_model(model)
    callback.set_params({"epochs": 1000})  # never the last epoch: no finalize
    labels = []
    for event in events:
      if event.startswith("on_epoch"):
        getattr(callback, event)(0)
      else:
        getattr(callback, event)()
      labels.append(label([np.asarray(v.value) for v in model.trainable_variables]))
    return labels

  run.original = keras.callbacks.SwapEMAWeights
  return run


@functools.cache
def linen_state():
  tx = optax.chain(optax.sgd(0.5), ema_jax.ema(0.5))
  state = train_state.TrainState.create(
      apply_fn=None,
      params={"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)},
      tx=tx,
  )
  for g in (1.0, -3.0):
    state = state.apply_gradients(
        grads={"w": jnp.array([g, 2 * g]), "b": jnp.array(g)}
    )
  return state


def run_linen(events, swap_on_epoch):
  state = linen_state()
  label = Labeller(state.params, ema_jax.ema_params(state.opt_state))
  hook = ema_jax.flax.SwapEMAWeights(swap_on_epoch=swap_on_epoch)
  labels = []
  for event in events:
    state = getattr(hook, event)(state)
    labels.append(label(state.params))
  return labels


class Net(nnx.Module):
  """A model with parameters, BatchNorm statistics and dropout RNG state."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.norm(self.dense(x)))))


def net_loss(model, x):
  return jnp.mean((model(x) - 1.0) ** 2)


X = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)


@nnx.jit
def nnx_step(model, optimizer, x):
  nnx_step.traces += 1
  grads = nnx.grad(net_loss)(model, x)
  optimizer.update(model, grads)


nnx_step.traces = 0
# One transformation per setting: `tx` is static in the optimizer's graph, so
# reusing it lets `nnx_step` reuse its compilation across tests.
EMAS = {decay: ema_jax.ema(decay) for decay in (0.5, 0.75)}
TXS = {decay: optax.chain(optax.sgd(0.1), ema) for decay, ema in EMAS.items()}


def nnx_setup(decay=0.5, steps=2, average_stats=False):
  model = Net(nnx.Rngs(0, dropout=1))
  if average_stats:
    optimizer = ema_jax.flax.Optimizer(
        model, TXS[decay], wrt=nnx.Param, average_stats=EMAS[decay]
    )
  else:
    optimizer = nnx.Optimizer(model, TXS[decay], wrt=nnx.Param)
  for i in range(steps):
    nnx_step(model, optimizer, X * (i + 1))
  return model, optimizer, nnx_step


@functools.cache
def nnx_trained():
  return nnx_setup()


def run_nnx(events, swap_on_epoch):
  model, optimizer, _ = nnx_trained()
  # Start from the raw weights; `on_test_end` is a no-op if they are in.
  ema_jax.flax.SwapEMAWeights().on_test_end(model, optimizer)
  label = Labeller(
      nnx.state(model, nnx.Param), ema_jax.ema_params(nnx.as_pure(optimizer.opt_state))
  )
  hook = ema_jax.flax.SwapEMAWeights(swap_on_epoch=swap_on_epoch)
  labels = []
  for event in events:
    assert getattr(hook, event)(model, optimizer) is None
    labels.append(label(nnx.state(model, nnx.Param)))
  return labels


FIT = [  # what keras' fit does over two epochs with validation, then predict
    "on_epoch_begin", "on_test_begin", "on_test_end", "on_epoch_end",
    "on_epoch_begin", "on_test_begin", "on_test_end", "on_epoch_end",
    "on_predict_begin", "on_predict_end", "on_test_begin", "on_test_end",
]  # fmt: skip


def sequences():
  rng = np.random.default_rng(0)
  out = [FIT, ["on_test_end", "on_predict_end", "on_epoch_begin"]]
  out += [["on_test_begin"] * 2 + ["on_test_end"] * 2]
  out += [list(rng.choice(EVENTS, 7)) for _ in range(12)]
  return out


@pytest.mark.parametrize("swap_on_epoch", [False, True])
def test_linen_and_nnx_follow_keras(keras_reference, swap_on_epoch):
  for events in sequences():
    expected = keras_reference(events, swap_on_epoch)
    assert "corrupt" not in expected
    assert run_linen(events, swap_on_epoch) == expected, events
    assert run_nnx(events, swap_on_epoch) == expected, events


def test_fit_sequence_labels(keras_reference):
  # The Keras semantics spelled out, so a reader sees what is compared.
  assert keras_reference(FIT, False) == [
      "raw", "ema", "raw", "raw",
      "raw", "ema", "raw", "raw",
      "ema", "raw", "ema", "raw",
  ]  # fmt: skip
  assert keras_reference(FIT, True) == [
      "raw", "ema", "raw", "ema",
      "raw", "ema", "raw", "ema",
      "ema", "raw", "ema", "raw",
  ]  # fmt: skip


def test_we_swap_back_after_predict_where_keras_does_not(keras_reference):
  events = ["on_predict_begin", "on_predict_end"]
  # The reference pinned: Keras 3.15's own callback leaves the EMA in.
  assert keras_reference(events, False, keras_reference.original) == ["ema", "ema"]
  assert run_linen(events, False) == ["ema", "raw"]
  assert run_nnx(events, False) == ["ema", "raw"]


# ------------------------------------------------------------- exactness, Linen


def test_linen_round_trip_is_exact_and_noops_return_the_same_state():
  state = linen_state()
  hook = ema_jax.flax.SwapEMAWeights()
  assert hook.on_test_end(state) is state  # nothing to restore: no-op
  ema_in = hook.on_test_begin(state)
  assert hook.on_test_begin(ema_in) is ema_in  # already in: no-op
  assert ema_jax.flax.is_swapped(ema_in) and not ema_jax.flax.is_swapped(state)
  assert_bitwise(ema_in.params, ema_jax.ema_params(state.opt_state))
  back = hook.on_test_end(ema_in)
  assert_bitwise(back.params, state.params)
  assert_bitwise(back.opt_state, state.opt_state)
  assert type(back.opt_state[1]) is ema_jax.EmaState


def test_linen_hook_under_jit_and_training_while_swapped_fails():
  state = linen_state()
  hook = ema_jax.flax.SwapEMAWeights()

  @jax.jit
  def evaluate(state):
    ema_in = hook.on_test_begin(state)
    return jnp.sum(ema_in.params["w"]) + ema_in.params["b"], hook.on_test_end(ema_in)

  value, back = evaluate(state)
  ema = ema_jax.ema_params(state.opt_state)
  assert float(value) == float(jnp.sum(ema["w"]) + ema["b"])
  assert_bitwise(back.params, state.params)

  swapped = hook.on_test_begin(state)
  grads = {"w": jnp.ones(2), "b": jnp.array(1.0)}
  with pytest.raises(ValueError, match="swapped EMA state"):
    jax.jit(lambda s: s.apply_gradients(grads=grads))(swapped)


def test_linen_hook_keeps_subclass_fields_and_ignores_batch_stats():
  class WithStats(train_state.TrainState):
    batch_stats: dict

  base = linen_state()
  state = WithStats.create(
      apply_fn=None, params=base.params, tx=base.tx, batch_stats={"m": jnp.ones(2)}
  )
  state = state.replace(opt_state=base.opt_state)
  ema_in = ema_jax.flax.SwapEMAWeights().on_test_begin(state)
  assert isinstance(ema_in, WithStats)
  assert ema_in.batch_stats is state.batch_stats  # not averaged, not swapped


def test_several_ema_states_need_which():
  tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.5), ema_jax.ema(0.0))
  state = train_state.TrainState.create(
      apply_fn=None, params={"w": jnp.zeros(1)}, tx=tx
  )
  state = state.apply_gradients(grads={"w": jnp.ones(1)})  # params -1; EMAs -0.5, -1
  with pytest.raises(ValueError, match="which=i"):
    ema_jax.flax.SwapEMAWeights().on_test_begin(state)
  ema_in = ema_jax.flax.SwapEMAWeights(which=0).on_test_begin(state)
  assert float(ema_in.params["w"][0]) == -0.5
  assert ema_jax.flax.is_swapped(ema_in, which=0)
  assert not ema_jax.flax.is_swapped(ema_in, which=1)


def test_hook_rejects_wrong_arguments():
  hook = ema_jax.flax.SwapEMAWeights()
  with pytest.raises(TypeError, match="TrainState"):
    hook.on_test_begin({"w": jnp.zeros(1)})
  model, optimizer, _ = nnx_setup(steps=0)
  with pytest.raises(TypeError, match="pass its optimizer"):
    hook.on_test_begin(model)
  with pytest.raises(TypeError, match="state alone"):
    hook.on_test_begin(linen_state(), optimizer)
  with pytest.raises(TypeError, match="swap_on_epoch"):
    ema_jax.flax.SwapEMAWeights(swap_on_epoch="yes")


# -------------------------------------------------------------- exactness, NNX


def test_nnx_model_with_rngs_and_batch_stats_round_trip():
  model, optimizer, step = nnx_setup(steps=3)
  before = nnx.state(model)
  not_params = nnx.state(model, nnx.Not(nnx.Param))
  opt_before = nnx.as_pure(optimizer.opt_state)
  ema = ema_jax.ema_params(opt_before)
  hook = ema_jax.flax.SwapEMAWeights()

  hook.on_test_begin(model, optimizer)
  assert_bitwise(nnx.as_pure(nnx.state(model, nnx.Param)), ema)
  # Everything but the params is untouched: statistics and RNG streams.
  assert_bitwise(nnx.state(model, nnx.Not(nnx.Param)), not_params)
  model.eval()
  y_ema = model(X)
  reference = nnx.clone(model)
  nnx.update(reference, ema)
  assert_bitwise(y_ema, reference(X))
  model.train()
  with pytest.raises(ValueError, match="swapped EMA state"):
    step(model, optimizer, X)
  hook.on_test_end(model, optimizer)

  assert_bitwise(nnx.state(model), before)
  assert_bitwise(nnx.as_pure(optimizer.opt_state), opt_before)
  traces = step.traces
  step(model, optimizer, X)  # the round trip does not recompile
  assert step.traces == traces


def _variables(tree):
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


ADAMW_TX = optax.chain(optax.adamw(0.1), ema_jax.ema(0.5))


@pytest.mark.standard_promotion  # optax.adamw is not strict-clean
@pytest.mark.parametrize("tied", [False, True], ids=["pytree", "shared-variable"])
def test_nnx_round_trip_touches_only_the_ema_state(monkeypatch, tied):
  # The swap's host cost must not grow with the rest of the optimizer state:
  # Adam's moments are neither read into new containers nor written.
  model = Net(nnx.Rngs(0, dropout=1))
  if tied:  # a Variable held twice: read through `nnx.state` instead
    model.tied = model.out
  optimizer = nnx.Optimizer(model, ADAMW_TX, wrt=nnx.Param)
  for i in range(2):
    optimizer.update(model, nnx.grad(net_loss)(model, X * (i + 1)))
  adam = _variables(optimizer.opt_state[0])
  adam_values = [v.get_raw_value() for v in adam]
  ema_state = optimizer.opt_state[1]
  kept = _variables((ema_state.count, ema_state.ema))
  params = _variables(nnx.state(model, nnx.Param))
  before = nnx.state(model)
  written = []
  set_value = nnx.Variable.set_value

  def counting(self, *args, **kwargs):
    written.append(self)
    return set_value(self, *args, **kwargs)

  monkeypatch.setattr(nnx.Variable, "set_value", counting)
  with ema_jax.flax.ema_weights(model, optimizer):
    assert ema_jax.flax.is_swapped(optimizer)
  hook = ema_jax.flax.SwapEMAWeights()
  hook.on_test_begin(model, optimizer)
  hook.on_test_end(model, optimizer)

  # Only the model's params and the EMA's count (its swapped shape marks the
  # swap for cached graphs) were written, each once per toggle.
  count = _variables(ema_state.count)
  assert len(written) == 4 * (len(params) + 1)
  assert {id(v) for v in written} == {id(v) for v in params + count}
  # Adam's moments: the same Variables, holding the same arrays.
  assert all(a is b for a, b in zip(_variables(optimizer.opt_state[0]), adam))
  assert all(v.get_raw_value() is x for v, x in zip(adam, adam_values))
  # The EMA's own count and average keep their Variables (no recompile).
  back = optimizer.opt_state[1]
  assert all(a is b for a, b in zip(_variables((back.count, back.ema)), kept))
  assert_bitwise(nnx.state(model), before)


def test_nnx_context_manager_swaps_back_on_error():
  model, optimizer, _ = nnx_setup()
  before = nnx.state(model)
  ema = ema_jax.ema_params(nnx.as_pure(optimizer.opt_state))
  with ema_jax.flax.ema_weights(model, optimizer) as m:
    assert m is model
    assert_bitwise(nnx.as_pure(nnx.state(model, nnx.Param)), ema)
  assert_bitwise(nnx.state(model), before)

  with pytest.raises(ZeroDivisionError):
    with ema_jax.flax.ema_weights(model, optimizer):
      assert ema_jax.flax.is_swapped(optimizer)
      1 / 0
  assert not ema_jax.flax.is_swapped(optimizer)
  assert_bitwise(nnx.state(model), before)

  # Entered with the EMA in: it leaves it in, as it found it.
  ema_jax.flax.SwapEMAWeights().on_test_begin(model, optimizer)
  with ema_jax.flax.ema_weights(model, optimizer):
    pass
  assert ema_jax.flax.is_swapped(optimizer)


def test_linen_context_manager_yields_a_swapped_copy():
  state = linen_state()
  with ema_jax.flax.ema_weights(state) as ema_in:
    assert_bitwise(ema_in.params, ema_jax.ema_params(state.opt_state))
  assert not ema_jax.flax.is_swapped(state)


# ------------------------------------------------------ non-parameter state


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
    return nn.Dense(2)(nn.relu(x))


def linen_run(average_stats, decay=0.75, steps=4):
  model = LinenNet()
  variables = model.init(jax.random.key(0), X)
  ema = ema_jax.ema(decay)
  state = ema_jax.flax.TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      tx=optax.chain(optax.sgd(0.1), ema),
      batch_stats=variables["batch_stats"],
      average_stats=ema if average_stats else None,
  )

  @jax.jit
  def step(state, x):
    def loss(params):
      y, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats},
          x,
          mutable=["batch_stats"],
      )
      return jnp.mean((y - 1.0) ** 2), updates["batch_stats"]

    grads, stats = jax.grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats)

  history = [variables["batch_stats"]]
  for i in range(steps):
    state = step(state, X * (i + 1) + i)
    history.append(state.batch_stats)
  return state, history


def ema_by_hand(history, decay):
  """e_0 = s_0; e_t = d e_{t-1} + (1 - d) s_t, in float64."""
  e = jax.tree.map(lambda s: np.asarray(s, np.float64), history[0])
  for s in history[1:]:
    e = jax.tree.map(lambda a, b: decay * a + (1 - decay) * np.asarray(b), e, s)
  return e


def test_linen_batch_stats_not_averaged_by_default():
  state, _ = linen_run(average_stats=False)
  assert state.stats_ema is None
  ema_in = ema_jax.flax.SwapEMAWeights().on_test_begin(state)
  assert ema_in.batch_stats is state.batch_stats
  exported = ema_jax.flax.export_ema(state)
  assert_bitwise(exported["batch_stats"], state.batch_stats)


def test_linen_batch_stats_averaged_on_request():
  state, history = linen_run(average_stats=True)
  expected = ema_by_hand(history, 0.75)
  np.testing.assert_allclose(
      jax.tree.leaves(state.stats_ema.ema), jax.tree.leaves(expected), rtol=1e-6
  )
  hook = ema_jax.flax.SwapEMAWeights()
  ema_in = hook.on_test_begin(state)
  assert_bitwise(ema_in.batch_stats, state.stats_ema.ema)
  assert_bitwise(ema_in.params, ema_jax.ema_params(state.opt_state))
  # Evaluate with the EMA of both, then back to the raw state, bit for bit.
  ema_in.apply_fn(
      {"params": ema_in.params, "batch_stats": ema_in.batch_stats}, X, train=False
  )
  back = hook.on_test_end(ema_in)
  assert_bitwise(back.batch_stats, state.batch_stats)
  assert_bitwise(back.stats_ema, state.stats_ema)
  exported = ema_jax.flax.export_ema(state)
  assert_bitwise(exported["batch_stats"], state.stats_ema.ema)


def test_linen_params_and_stats_swapped_separately_is_an_error():
  state, _ = linen_run(average_stats=True, steps=1)
  params, opt_state = ema_jax.swap(state.params, state.opt_state)
  half = state.replace(params=params, opt_state=opt_state)
  with pytest.raises(ValueError, match="swapped separately"):
    ema_jax.flax.SwapEMAWeights().on_test_end(half)
  with pytest.raises(ValueError, match="`batch_stats` is None"):
    ema_jax.flax.TrainState.create(
        apply_fn=None, params={}, tx=optax.sgd(1.0), average_stats=ema_jax.ema()
    )


def test_nnx_batch_stats_not_averaged_by_default():
  model, optimizer, _ = nnx_setup(steps=2)
  stats_before = nnx.state(model, nnx.BatchStat)
  with ema_jax.flax.ema_weights(model, optimizer):
    assert_bitwise(nnx.state(model, nnx.BatchStat), stats_before)


def test_nnx_batch_stats_averaged_on_request():
  decay = 0.75
  model, optimizer, step = nnx_setup(decay=decay, steps=0, average_stats=True)
  history = [nnx.as_pure(nnx.state(model, nnx.BatchStat))]
  for i in range(4):
    step(model, optimizer, X * (i + 1) + i)
    history.append(nnx.as_pure(nnx.state(model, nnx.BatchStat)))
  stats_ema = ema_jax.ema_params(nnx.as_pure(optimizer.stats_ema))
  np.testing.assert_allclose(
      jax.tree.leaves(stats_ema), jax.tree.leaves(ema_by_hand(history, decay)), rtol=1e-6
  )
  before = nnx.state(model)
  params_ema = ema_jax.ema_params(nnx.as_pure(optimizer.opt_state))
  hook = ema_jax.flax.SwapEMAWeights()
  hook.on_test_begin(model, optimizer)
  assert_bitwise(nnx.as_pure(nnx.state(model, nnx.BatchStat)), stats_ema)
  assert_bitwise(nnx.as_pure(nnx.state(model, nnx.Param)), params_ema)
  assert type(optimizer.stats_ema) is ema_jax.SwappedEmaState
  with pytest.raises(ValueError, match="swapped EMA state"):
    step(model, optimizer, X)
  hook.on_test_end(model, optimizer)
  assert_bitwise(nnx.state(model), before)

  exported = ema_jax.flax.export_ema(model, optimizer)
  assert_bitwise(nnx.as_pure(nnx.state(exported, nnx.BatchStat)), stats_ema)
  assert_bitwise(nnx.state(model), before)


# ---------------------------------------------------------- multi-EMA states


MULTI_DECAYS = (0.5, 0.9)
MULTI_TX = optax.chain(optax.sgd(0.5), ema_jax.multi_ema(list(MULTI_DECAYS)))
MULTI_GRADS = (1.0, -3.0)


def multi_linen_state():
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=MULTI_TX)
  for g in MULTI_GRADS:
    state = state.apply_gradients(grads={"w": jnp.array([g, 2 * g]), "b": jnp.array(g)})
  return state


def multi_by_hand(decay):
  """e_0 = p_0; e_t = d e_{t-1} + (1 - d) p_t, with p_t from SGD, in float64."""
  p = {"w": np.array([1.0, -2.0]), "b": np.array(0.5)}
  e = dict(p)
  for g in MULTI_GRADS:
    p = {"w": p["w"] - 0.5 * np.array([g, 2 * g]), "b": p["b"] - 0.5 * g}
    e = {k: decay * e[k] + (1 - decay) * p[k] for k in e}
  return e


def test_linen_hook_swaps_one_average_of_a_multi_ema_in_and_back():
  state = multi_linen_state()
  averages = [ema_jax.ema_params(state.opt_state, index=i) for i in range(2)]
  for average, decay in zip(averages, MULTI_DECAYS):
    for k, v in multi_by_hand(decay).items():
      np.testing.assert_allclose(average[k], v, rtol=1e-6)
  assert not np.array_equal(averages[0]["w"], averages[1]["w"])

  with pytest.raises(ValueError, match="pass `index=i`"):
    ema_jax.flax.SwapEMAWeights().on_test_begin(state)
  with pytest.raises(ValueError, match="single EMA"):
    ema_jax.flax.SwapEMAWeights(index=1).on_test_begin(linen_state())
  with pytest.raises(TypeError, match="`index` must be an int"):
    ema_jax.flax.SwapEMAWeights(index="1")

  hook = ema_jax.flax.SwapEMAWeights(index=1)
  ema_in = hook.on_test_begin(state)
  assert ema_jax.flax.is_swapped(ema_in)
  assert_bitwise(ema_in.params, averages[1])
  assert hook.on_test_begin(ema_in) is ema_in  # already in: no-op
  back = hook.on_test_end(ema_in)
  assert not ema_jax.flax.is_swapped(back)
  assert_bitwise(back.params, state.params)
  assert_bitwise(back.opt_state, state.opt_state)
  # Swapping back needs no index: the swapped state records it.
  assert_bitwise(ema_jax.flax.SwapEMAWeights().on_test_end(ema_in).params, state.params)

  with ema_jax.flax.ema_weights(state, index=0) as ema0:
    assert_bitwise(ema0.params, averages[0])
  assert_bitwise(ema_jax.flax.export_ema(state, index=1)["params"], averages[1])


def test_nnx_hook_swaps_one_average_of_a_multi_ema_in_and_back():
  model = Net(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, MULTI_TX, wrt=nnx.Param)
  for i in range(2):
    nnx_step(model, optimizer, X * (i + 1))
  before = nnx.state(model)
  opt_before = nnx.state(optimizer)
  averages = [ema_jax.ema_params(nnx.as_pure(optimizer.opt_state), index=i) for i in range(2)]

  with pytest.raises(ValueError, match="pass `index=i`"):
    ema_jax.flax.SwapEMAWeights().on_test_begin(model, optimizer)
  assert_bitwise(nnx.state(model), before)  # the failed swap changed nothing

  hook = ema_jax.flax.SwapEMAWeights(index=1)
  hook.on_test_begin(model, optimizer)
  assert ema_jax.flax.is_swapped(optimizer)
  assert_bitwise(nnx.as_pure(nnx.state(model, nnx.Param)), averages[1])
  hook.on_test_end(model, optimizer)
  assert_bitwise(nnx.state(model), before)
  assert_bitwise(nnx.state(optimizer), opt_before)

  with ema_jax.flax.ema_weights(model, optimizer, index=0):
    assert_bitwise(nnx.as_pure(nnx.state(model, nnx.Param)), averages[0])
  assert_bitwise(nnx.state(model), before)
  exported = ema_jax.flax.export_ema(model, optimizer, index=1)
  assert_bitwise(nnx.as_pure(nnx.state(exported, nnx.Param)), averages[1])
  assert_bitwise(nnx.state(model), before)


# ------------------------------------- statistics' EMA under optax.MultiSteps


K = 4  # every_k_schedule
CALLS = 10  # real updates at calls 4 and 8; 9 and 10 only accumulate


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_linen_stats_ema_steps_only_with_the_params_ema(jit):
  ema = ema_jax.ema(0.5)
  state = ema_jax.flax.TrainState.create(
      apply_fn=None,
      params={"w": jnp.zeros(2)},
      tx=optax.MultiSteps(optax.chain(optax.sgd(0.1), ema), every_k_schedule=K),
      batch_stats={"m": jnp.zeros(2)},
      average_stats=ema,
  )

  def step(state, i):
    stats = {"m": jnp.array([1.0, 3.0]) * (i + 1)}
    return state.apply_gradients(grads={"w": jnp.ones(2)}, batch_stats=stats)

  step = jax.jit(step) if jit else step
  history = [state.batch_stats]  # the statistics at real updates
  for i in range(CALLS):
    state = step(state, i)
    if (i + 1) % K == 0:
      history.append(state.batch_stats)
  assert int(state.opt_state.inner_opt_state[1].count) == CALLS // K
  assert int(state.stats_ema.count) == CALLS // K
  # 0.5 * (0.5 * 0 + 0.5 * 4 s) + 0.5 * 8 s = 5 s, exact in float32
  np.testing.assert_array_equal(state.stats_ema.ema["m"], [5.0, 15.0])
  np.testing.assert_array_equal(state.stats_ema.ema["m"], ema_by_hand(history, 0.5)["m"])


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_nnx_stats_ema_steps_only_with_the_params_ema():
  ema = ema_jax.ema(0.5)
  model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
  optimizer = ema_jax.flax.Optimizer(
      model,
      optax.MultiSteps(optax.chain(optax.sgd(0.1), ema), every_k_schedule=K),
      wrt=nnx.Param,
      average_stats=ema,
  )

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: (m(x) ** 2).mean())(model)  # moves the statistics
    optimizer.update(model, grads)

  history = [nnx.as_pure(nnx.state(model, nnx.BatchStat))]
  for i in range(CALLS):
    step(model, optimizer, X[:, :2] * (i + 1) + i)
    if (i + 1) % K == 0:
      history.append(nnx.as_pure(nnx.state(model, nnx.BatchStat)))
  opt_state = nnx.as_pure(optimizer.opt_state)
  assert int(opt_state.inner_opt_state[1].count) == CALLS // K
  stats_ema = nnx.as_pure(optimizer.stats_ema)
  assert int(stats_ema.count) == CALLS // K
  # The statistics moved on every call, so stepping on other calls would differ.
  assert not np.array_equal(
      jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.BatchStat)))[0],
      jax.tree.leaves(history[-1])[0],
  )
  np.testing.assert_allclose(
      jax.tree.leaves(stats_ema.ema), jax.tree.leaves(ema_by_hand(history, 0.5)), rtol=1e-6
  )
