"""Live parity with Keras 3 (JAX backend): `presets.keras` against `use_ema=True`.

Keras is driven step by step with `optimizer.apply_gradients` on fixed random
gradients. Two kinds of comparison:

* EMA only: ema_jax is fed Keras' own parameter trajectory (the values Keras
  averages, recorded at the moment it averages them), so any difference is in
  the EMA arithmetic or its step conventions. Run eagerly, the two are
  bit-for-bit identical; jitted, XLA may fuse `d * e + (1 - d) * p` into
  fused multiply-adds, which moves the last bit.
* End to end: `optax.chain(<optimizer>, presets.keras(m, F))` from the same
  initial weights and gradients, params and EMA compared at every step.
  optax's Adam places epsilon differently from Keras' (Keras adds it to
  `sqrt(v)` before bias correction), so it is compared within a tolerance;
  `_keras_adam` below restates Keras' Adam as an optax transformation to show
  the EMA preset itself adds no difference.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_jax
from ema_jax import presets

keras = pytest.importorskip(
    "keras", reason="keras is not installed (it is in the `test` extras)"
)
if keras.backend.backend() != "jax":
  pytest.skip(
      f"keras was loaded with the {keras.backend.backend()!r} backend; these "
      "tests need KERAS_BACKEND=jax set before keras is first imported",
      allow_module_level=True,
  )

STEPS = 30
SGD_LR = 0.1
ADAM_LR = 0.01

CONFIGS = [
    (optimizer, momentum, frequency)
    for optimizer in ("sgd", "adam")
    for momentum in (0.9, 0.99)
    for frequency in (None, 3)
]


class KerasRun(NamedTuple):
  initial: list[np.ndarray]  # weights before the first step
  grads: list[list[np.ndarray]]  # [step][variable]
  averaged: list[list[np.ndarray]]  # the weights Keras averaged at each step
  params: list[list[np.ndarray]]  # the weights after each step (overwritten)
  emas: list[list[np.ndarray]]  # Keras' averages after each step
  optimizer: Any


@functools.lru_cache(maxsize=None)
def _keras_run(optimizer: str, momentum: float, frequency: int | None) -> KerasRun:
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.Input((3,)),
      keras.layers.Dense(5, activation="relu"),
      keras.layers.Dense(4),
      keras.layers.Dense(2),
  ])
  ema_kwargs = dict(
      use_ema=True, ema_momentum=momentum, ema_overwrite_frequency=frequency
  )
  if optimizer == "sgd":
    opt = keras.optimizers.SGD(SGD_LR, **ema_kwargs)
  else:
    opt = keras.optimizers.Adam(ADAM_LR, **ema_kwargs)
  variables = model.trainable_variables
  initial = [np.array(v.value) for v in variables]

  # Record the weights Keras averages: the optimizer's own update has been
  # applied and an overwrite (if due) has not happened yet.
  averaged: list[list[np.ndarray]] = []
  update_average = opt._update_model_variables_moving_average

  def spy(trainable_variables):
    averaged.append([np.array(v.value) for v in trainable_variables])
    return update_average(trainable_variables)

  opt._update_model_variables_moving_average = spy

  rng = np.random.default_rng(1)
  grads, params, emas = [], [], []
  for _ in range(STEPS):
    g = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
    opt.apply_gradients(zip(g, variables))
    grads.append(g)
    params.append([np.array(v.value) for v in variables])
    emas.append([np.array(a.value) for a in opt._model_variables_moving_average])
  assert len(averaged) == STEPS, (
      "Keras no longer calls `_update_model_variables_moving_average` once per "
      "step; update the spy in this test."
  )
  assert int(opt.iterations) == STEPS
  return KerasRun(initial, grads, averaged, params, emas, opt)


def _assert_bitwise(actual, expected, what: str, step: int) -> None:
  for i, (a, b) in enumerate(zip(actual, expected)):
    np.testing.assert_array_equal(
        np.asarray(a), b, err_msg=f"{what}, step {step}, variable {i}"
    )


def _assert_close(actual, expected, what: str, step: int, rtol, atol) -> None:
  for i, (a, b) in enumerate(zip(actual, expected)):
    np.testing.assert_allclose(
        np.asarray(a),
        b,
        rtol=rtol,
        atol=atol,
        err_msg=f"{what}, step {step}, variable {i}",
    )


def _is_overwrite_step(t: int, frequency: int | None) -> bool:
  return frequency is not None and t % frequency == 0


def _assert_overwritten(new_params, emas, before, step: int) -> None:
  # Keras assigns the average; ema_jax overwrites through the update it
  # returns, `e - p`, and `p + (e - p)` may round to a neighbour of `e`: at
  # most one rounding of each operation, bounded by the spacing at the larger
  # of |e| and |p|.
  for i, (a, e, p) in enumerate(zip(new_params, emas, before)):
    bound = 2 * np.spacing(np.maximum(np.abs(e), np.abs(np.asarray(p))))
    err = np.abs(np.asarray(a) - e)
    assert np.all(err <= bound), (
        f"overwrite, step {step}, variable {i}: params are {err.max()} from "
        f"the EMA, more than float32 rounding of `p + (e - p)` ({bound.max()})"
    )


# ---------------------------------------------------------------------------
# The EMA on Keras' own trajectory.


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("optimizer, momentum, frequency", CONFIGS)
def test_ema_is_bitwise_keras_on_its_trajectory(optimizer, momentum, frequency):
  run = _keras_run(optimizer, momentum, frequency)
  tx = presets.keras(momentum, ema_overwrite_frequency=frequency)
  state = tx.init([jnp.asarray(x) for x in run.initial])
  for t in range(1, STEPS + 1):
    # `params + updates` must be exactly what Keras averaged: give it as
    # params with zero updates.
    p = [jnp.asarray(x) for x in run.averaged[t - 1]]
    updates, state = tx.update([jnp.zeros_like(x) for x in p], state, p)
    _assert_bitwise(ema_jax.ema_params(state), run.emas[t - 1], "EMA", t)
    new_params = optax.apply_updates(p, updates)
    if _is_overwrite_step(t, frequency):
      _assert_bitwise(run.params[t - 1], run.emas[t - 1], "Keras' overwrite", t)
      _assert_overwritten(new_params, run.emas[t - 1], run.averaged[t - 1], t)
    else:
      _assert_bitwise(new_params, run.params[t - 1], "params", t)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("optimizer, momentum, frequency", CONFIGS)
def test_ema_matches_keras_trajectory_jitted(optimizer, momentum, frequency):
  # The usual call: params before the step and the step as updates.
  run = _keras_run(optimizer, momentum, frequency)
  tx = presets.keras(momentum, ema_overwrite_frequency=frequency)
  update = jax.jit(tx.update)
  state = tx.init([jnp.asarray(x) for x in run.initial])
  prev = run.initial
  for t in range(1, STEPS + 1):
    step = [a - b for a, b in zip(run.averaged[t - 1], prev)]
    p = [jnp.asarray(x) for x in prev]
    updates, state = update([jnp.asarray(x) for x in step], state, p)
    # A few float32 ulps: XLA contracts `d * e + (1 - d) * p` into a fused
    # multiply-add, which Keras' op-by-op eager update does not.
    ema = ema_jax.ema_params(state)
    _assert_close(ema, run.emas[t - 1], "EMA", t, 2e-6, 2e-7)
    new_params = optax.apply_updates(p, updates)
    _assert_close(new_params, run.params[t - 1], "params", t, 2e-6, 2e-7)
    if _is_overwrite_step(t, frequency):
      _assert_overwritten(new_params, [np.asarray(e) for e in ema], prev, t)
    prev = run.params[t - 1]


def test_keras_first_step_copies_and_never_sees_the_initial_weights():
  run = _keras_run("sgd", 0.9, None)
  _assert_bitwise(run.emas[0], run.averaged[0], "Keras EMA after step 1", 1)
  tx = presets.keras(0.9)
  # Any initial weights give the same EMA: step 1 copies.
  state = tx.init([jnp.full(x.shape, 123.0) for x in run.initial])
  p = [jnp.asarray(x) for x in run.averaged[0]]
  _, state = tx.update([jnp.zeros_like(x) for x in p], state, p)
  _assert_bitwise(ema_jax.ema_params(state), run.emas[0], "EMA", 1)


# ---------------------------------------------------------------------------
# End to end: an optax optimizer chained with the preset.


class _KerasAdamState(NamedTuple):
  count: jax.Array  # shape=(), int32
  m: Any
  v: Any


def _keras_adam(learning_rate, beta_1, beta_2, epsilon):
  """Keras 3's `Adam.update_step` (keras/src/optimizers/adam.py), op for op."""

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p)
    return _KerasAdamState(
        jnp.zeros((), jnp.int32),
        jax.tree.map(zeros, params),
        jax.tree.map(zeros, params),
    )

  def update_fn(grads, state, params=None):
    del params
    local_step = (state.count + 1).astype(jnp.float32)
    lr = jnp.asarray(learning_rate, jnp.float32)
    beta_1_power = jnp.power(jnp.asarray(beta_1, jnp.float32), local_step)
    beta_2_power = jnp.power(jnp.asarray(beta_2, jnp.float32), local_step)
    alpha = lr * jnp.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m = jax.tree.map(lambda m, g: m + (g - m) * (1 - beta_1), state.m, grads)
    v = jax.tree.map(
        lambda v, g: v + (jnp.square(g) - v) * (1 - beta_2), state.v, grads
    )
    updates = jax.tree.map(
        lambda m, v: -((m * alpha) / (jnp.sqrt(v) + epsilon)), m, v
    )
    return updates, _KerasAdamState(state.count + 1, m, v)

  return optax.GradientTransformation(init_fn, update_fn)


def _base_optimizer(kind: str, keras_opt: Any) -> optax.GradientTransformation:
  if kind == "sgd":
    return optax.sgd(SGD_LR)
  b1, b2, eps = keras_opt.beta_1, keras_opt.beta_2, keras_opt.epsilon
  if kind == "optax_adam":
    return optax.adam(ADAM_LR, b1=b1, b2=b2, eps=eps)
  return _keras_adam(ADAM_LR, b1, b2, eps)


def _run_end_to_end(kind, momentum, frequency, jit):
  run = _keras_run("sgd" if kind == "sgd" else "adam", momentum, frequency)
  tx = optax.chain(
      _base_optimizer(kind, run.optimizer), presets.keras(momentum, ema_overwrite_frequency=frequency)
  )
  update = jax.jit(tx.update) if jit else tx.update
  params = [jnp.asarray(x) for x in run.initial]
  state = tx.init(params)
  out = []
  for t in range(1, STEPS + 1):
    grads = [jnp.asarray(g) for g in run.grads[t - 1]]
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append((params, ema_jax.ema_params(state)))
  return run, out


END_TO_END = [
    (kind, momentum, frequency)
    for kind in ("sgd", "keras_adam", "optax_adam")
    for momentum in (0.9, 0.99)
    for frequency in (None, 3)
]


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kind, momentum, frequency", END_TO_END)
def test_end_to_end_matches_keras(kind, momentum, frequency, jit):
  run, out = _run_end_to_end(kind, momentum, frequency, jit)
  if kind == "optax_adam":
    # Keras' epsilon acts as eps / sqrt(1 - beta_2 ** t) on optax's scale; it
    # matters for small gradients in the first steps (measured: 4e-6 at most).
    rtol, atol = 1e-4, 1e-5
  else:
    # Measured: 0 eagerly without overwrite, 4e-7 at most otherwise.
    rtol, atol = 1e-5, 1e-6
  before = run.initial
  for t, (params, ema) in enumerate(out, start=1):
    _assert_close(params, run.params[t - 1], "params", t, rtol, atol)
    _assert_close(ema, run.emas[t - 1], "EMA", t, rtol, atol)
    if _is_overwrite_step(t, frequency):
      _assert_overwritten(params, [np.asarray(e) for e in ema], before, t)
    before = params


@pytest.mark.parametrize("kind", ["sgd", "keras_adam"])
@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_end_to_end_is_bitwise_keras_eagerly(kind, momentum):
  # Without overwrite, the same optimizer arithmetic, run op by op as Keras
  # runs it, gives bit-identical params and EMA at every step.
  run, out = _run_end_to_end(kind, momentum, None, jit=False)
  for t, (params, ema) in enumerate(out, start=1):
    _assert_bitwise(params, run.params[t - 1], "params", t)
    _assert_bitwise(ema, run.emas[t - 1], "EMA", t)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_optax_adam_differs_from_keras_adam_only_by_epsilon():
  # The looser tolerance above is due to epsilon alone: with a negligible
  # epsilon the two Adams agree to float32 rounding.
  rng = np.random.default_rng(2)
  p0 = [rng.normal(size=(4, 3)).astype(np.float32)]
  grads = [[rng.normal(size=(4, 3)).astype(np.float32)] for _ in range(STEPS)]
  results = []
  for tx in (
      optax.adam(ADAM_LR, b1=0.9, b2=0.999, eps=1e-30),
      _keras_adam(ADAM_LR, 0.9, 0.999, 1e-30),
  ):
    params = [jnp.asarray(x) for x in p0]
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update([jnp.asarray(x) for x in g], state, params)
      params = optax.apply_updates(params, updates)
    results.append(np.asarray(params[0]))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Keras' `gradient_accumulation_steps`: the recipe in docs/migrating.md.


def keras_accumulation_recipe(
    learning_rate: float, momentum: float, steps: int
) -> optax.GradientTransformation:
  """Keras' EMA under `gradient_accumulation_steps=steps`, micro-step for micro-step.

  Keras averages on every micro-step, with `momentum = (iterations != 0) *
  ema_momentum` where `iterations` counts real updates: it copies for the
  first `steps` micro-steps, then moves on every one. The EMA goes outside
  `MultiSteps` (it sees every micro-step) and copies for `steps` of them.
  """
  return optax.chain(
      optax.MultiSteps(optax.sgd(learning_rate), steps).gradient_transformation(),
      ema_jax.ema(momentum, start_step=steps),
  )


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("accumulation", [2, 3])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_keras_gradient_accumulation_recipe_matches_keras(accumulation, jit):
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
  opt = keras.optimizers.SGD(
      SGD_LR, use_ema=True, ema_momentum=0.9,
      gradient_accumulation_steps=accumulation,
  )
  variables = model.trainable_variables
  tx = keras_accumulation_recipe(SGD_LR, 0.9, accumulation)
  update = jax.jit(tx.update) if jit else tx.update
  params = [jnp.asarray(np.array(v.value)) for v in variables]
  state = tx.init(params)
  rng = np.random.default_rng(3)
  for micro_step in range(1, 7 * accumulation + 1):
    g = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
    opt.apply_gradients(zip(g, variables))
    updates, state = update([jnp.asarray(x) for x in g], state, params)
    params = optax.apply_updates(params, updates)
    keras_params = [np.array(v.value) for v in variables]
    keras_ema = [np.array(a.value) for a in opt._model_variables_moving_average]
    _assert_close(params, keras_params, "params", micro_step, 1e-6, 1e-7)
    _assert_close(ema_jax.ema_params(state), keras_ema, "EMA", micro_step, 1e-6, 1e-7)
    if micro_step == accumulation:
      # The first real update is still copied (`iterations` is 0 until it).
      _assert_bitwise(keras_ema, keras_params, "Keras' copy", micro_step)
