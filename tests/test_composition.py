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


# ------------------------------------------ hyperparameters as JAX values


def _reference(params_seq, decays, start_step=0, update_every=1):
  """The EMA of a params sequence in float64, one decay per update."""
  e = np.asarray(params_seq[0], np.float64)
  for t, (p, d) in enumerate(zip(params_seq[1:], decays)):
    j = t - start_step
    if j < 0:
      e = np.asarray(p, np.float64)
    elif (j + 1) % update_every == 0:
      keep = float(np.prod([d] * update_every, dtype=np.float64))
      e = keep * e + (1 - keep) * np.asarray(p, np.float64)
  return e


def _sgd_run(tx, steps, params, state=None, change=None):
  """Plain SGD(1) on a fixed gradient sequence; the params after each update."""
  rng = np.random.default_rng(0)
  grads = [jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(steps)]
  state = tx.init(params) if state is None else state
  step = jax.jit(tx.update)
  seq = [np.asarray(params)]
  for t, g in enumerate(grads):
    if change is not None:
      state = change(t, state)
    updates, state = step(-g, state, params)
    params = params + updates
    seq.append(np.asarray(params))
  return seq, state


@pytest.mark.standard_promotion  # optax.inject_hyperparams' int32 count
def test_inject_hyperparams_decay_changes_mid_run():
  tx = optax.inject_hyperparams(ema_jax.ema)(decay=0.99)
  params = jnp.zeros(3, jnp.float32)

  def change(t, state):
    if t == 4:
      state.hyperparams["decay"] = jnp.asarray(0.5, jnp.float32)
    return state

  seq, state = _sgd_run(tx, 9, params, change=change)
  decays = [np.float64(np.float32(0.99))] * 4 + [0.5] * 5
  np.testing.assert_allclose(
      ema_jax.ema_params(state), _reference(seq, decays), rtol=1e-6, atol=1e-6
  )
  assert int(ema_jax.ema_params(state).shape[0]) == 3


@pytest.mark.standard_promotion
def test_inject_hyperparams_injects_start_step_and_update_every():
  # optax injects every numeric default: start_step, update_every and key
  # arrive traced, and keep working (changed mid-run too).
  tx = optax.inject_hyperparams(ema_jax.ema)(decay=0.9, start_step=2, update_every=3)
  params = jnp.zeros(3, jnp.float32)
  seq, state = _sgd_run(tx, 11, params)
  np.testing.assert_allclose(
      ema_jax.ema_params(state),
      _reference(seq, [np.float64(np.float32(0.9))] * 11, start_step=2, update_every=3),
      rtol=1e-6, atol=1e-6,
  )
  static_tx = ema_jax.ema(0.9, start_step=2, update_every=3)
  _, static_state = _sgd_run(static_tx, 11, params)
  np.testing.assert_allclose(
      ema_jax.ema_params(state), ema_jax.ema_params(static_state), rtol=1e-6
  )


@pytest.mark.standard_promotion
def test_inject_hyperparams_refuses_a_bfloat16_decay_by_name():
  # With bfloat16 params optax converts the decay to bfloat16: 0.99 -> 0.98828,
  # 0.999 -> 1.0 (a frozen average).
  params = jnp.zeros(3, jnp.bfloat16)
  tx = optax.inject_hyperparams(ema_jax.ema)(decay=0.999)
  with pytest.raises(TypeError, match="hyperparam_dtype=jnp.float32"):
    tx.init(params)
  tx = optax.inject_hyperparams(ema_jax.ema, hyperparam_dtype=jnp.float32)(decay=0.999)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(jnp.ones(3, jnp.bfloat16), state, params)
  np.testing.assert_allclose(
      np.asarray(ema_jax.ema_params(state), np.float64),
      1 - np.float64(np.float32(0.999)), rtol=1e-6,  # a float32 decay's weight
  )


def test_vmap_sweep_over_decays_equals_separate_runs():
  decays = jnp.asarray([0.0, 0.5, 0.9, 0.99, 1.0, 1.5, -0.5], jnp.float32)
  params = jnp.zeros(3, jnp.float32)
  rng = np.random.default_rng(1)
  grads = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)

  def run(decay):
    tx = optax.chain(optax.sgd(1.0), ema_jax.ema(decay))
    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, s), _ = jax.lax.scan(body, (params, tx.init(params)), grads)
    return ema_jax.ema_params(s)

  swept = jax.jit(jax.vmap(run))(decays)
  for i, d in enumerate(np.asarray(decays)):
    clipped = float(min(max(d, 0.0), 1.0))  # clipped at run time like schedules
    separate = run(clipped)
    np.testing.assert_array_equal(swept[i], separate)


def test_decay_computed_inside_the_step_and_schedule_closing_over_it():
  params = {"w": jnp.asarray([1.0, -2.0])}
  new = {"w": jnp.asarray([3.0, 0.0])}

  @jax.jit
  def step(d):
    outs = []
    for decay in (d, lambda count: d):  # a float and a schedule of it
      tx = ema_jax.ema(decay)
      outs.append(tx.update(new, tx.init(params), params)[1].ema["w"])
    return outs

  for a in step(jnp.float32(0.25)):
    np.testing.assert_allclose(a, 0.25 * np.array([1.0, -2.0]) + 0.75 * np.array([4.0, -2.0]))


def test_blend_with_a_traced_alpha():
  tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.5))
  params = jnp.asarray([0.0, 8.0])
  state = tx.init(params)
  updates, state = tx.update(jnp.asarray([-4.0, 0.0]), state, params)
  params = optax.apply_updates(params, updates)  # [4, 8]; the EMA [2, 8]
  blend = jax.jit(ema_jax.blend)
  for alpha in (0.0, 0.25, 1.0):
    np.testing.assert_array_equal(
        blend(params, state, jnp.float32(alpha)), ema_jax.blend(params, state, alpha)
    )
  # Out of range or NaN at run time: clipped as a decay's weight is.
  np.testing.assert_array_equal(blend(params, state, jnp.float32(2.0)), [2.0, 8.0])
  np.testing.assert_array_equal(blend(params, state, jnp.float32(np.nan)), [4.0, 8.0])
  with pytest.raises(TypeError, match="bfloat16"):
    ema_jax.blend(params, state, jnp.bfloat16(0.5))


# ---------------------------------------------- bounded build time of schedules


def _with_callback(count):
  jax.debug.callback(lambda c: None, count)
  return jnp.minimum(0.999, (1.0 + count) / (10.0 + count))


def _loop_to_count(count):
  return jax.lax.fori_loop(0, count, lambda i, x: x, jnp.float32(0.99))


def _tf_ramp_in_int32(count):  # 1 + count overflows only near 2**31
  return jnp.minimum(0.999, (1 + count) / (10 + count))


@pytest.mark.standard_promotion  # user schedules mixing int counts and floats
@pytest.mark.parametrize(
    "schedule", [_with_callback, _loop_to_count, _tf_ramp_in_int32],
    ids=["callback", "fori_loop", "int32 ramp"],
)
def test_schedules_build_with_a_bounded_probe(schedule):
  calls = []
  def counted(count):
    jax.debug.callback(lambda c: calls.append(np.size(c)), count)
    return schedule(count)

  tx = ema_jax.ema(counted)  # built: probed, accepted
  # The probe is one compiled evaluation on an array of counts (or a short
  # vmap), never a callback per probed step.
  assert len(calls) <= 200, len(calls)
  params = jnp.ones(2)
  _, state = tx.update(jnp.ones(2), tx.init(params), params)
  assert state.count == 1


@pytest.mark.standard_promotion
def test_a_schedule_wrong_at_a_reachable_step_is_still_refused():
  with pytest.raises(ValueError, match="-0.5 at step 5"):
    ema_jax.ema(lambda c: jnp.where(c == 5, -0.5, 0.9))
  with pytest.raises(ValueError, match="at step 5"):  # a scalar-only schedule
    ema_jax.ema(lambda c: jax.lax.cond(c == 5, lambda: -0.5, lambda: 0.9))
  with pytest.raises(ValueError, match=r"returns 1\.000\d* at step 1\d{5};"):
    ema_jax.ema(optax.linear_schedule(0.99, 1.01, 100_000 * 2))


def test_a_bfloat16_schedule_is_refused():
  with pytest.raises(TypeError, match="bfloat16.*float32"):
    ema_jax.ema(lambda c: jnp.asarray(0.999, jnp.bfloat16))


@pytest.mark.parametrize("update_every", [1, 2, 3])
def test_count_saturation_averages_every_update_whatever_update_every(update_every):
  # Past 2**31 - 1 updates the int32 count stops; every update then averages
  # with the one-step decay (update_every=2 and 3 used to differ: one averaged
  # every step, the other never).
  tx = ema_jax.ema(0.5, update_every=update_every)
  params = jnp.zeros(1)
  state = tx.init(params)._replace(count=jnp.asarray(2**31 - 1, jnp.int32))
  for target in (4.0, 8.0):
    _, state = tx.update(jnp.asarray([target]), state, params)
  np.testing.assert_array_equal(ema_jax.ema_params(state), [0.5 * 2.0 + 0.5 * 8.0])
  assert int(state.count) == 2**31 - 1


# ------------------------------------------------ offload meets the Flax hook


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


def _kinds(tree):
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


@pytest.mark.standard_promotion
def test_linen_hook_ema_weights_and_export_bring_an_offloaded_ema_to_the_device():
  model = _Mlp()
  x = jnp.ones((3, 2))
  params = jax.device_put(model.init(jax.random.key(0), x)["params"], jax.devices()[0])
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.5, memory_kind="pinned_host"))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  grads = jax.tree.map(jnp.ones_like, params)
  state = jax.jit(lambda s: s.apply_gradients(grads=grads))(state)
  expected = ema_jax.ema_params(state.opt_state, memory_kind="device")
  evaluate = jax.jit(lambda s: s.apply_fn({"params": s.params}, x))

  hook = ema_jax.flax.SwapEMAWeights()
  swapped = hook.on_test_begin(state)
  assert _kinds(swapped.params) == {"device"}
  assert _kinds(swapped.opt_state[1].raw_params) == {"pinned_host"}
  assert_bitwise_equal(swapped.params, expected)
  np.testing.assert_array_equal(
      evaluate(swapped), model.apply({"params": expected}, x))
  back = hook.on_test_end(swapped)
  assert _kinds(back.params) == {"device"}
  assert_bitwise_equal(back.params, state.params)
  assert _kinds(back.opt_state[1].ema) == {"pinned_host"}

  with ema_jax.flax.ema_weights(state) as ema_state:
    np.testing.assert_array_equal(evaluate(ema_state), model.apply({"params": expected}, x))
  exported = ema_jax.flax.export_ema(state)
  assert _kinds(exported["params"]) == {"device"}
  assert_bitwise_equal(exported["params"], expected)


@pytest.mark.standard_promotion
def test_nnx_hook_and_export_bring_an_offloaded_ema_to_the_device():
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.5, memory_kind="pinned_host"))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((3, 2))

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(_nnx_loss)(model, x))

  @nnx.jit
  def evaluate(model):
    return model(x)

  step(model, optimizer)
  raw = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.Param)))
  expected = ema_jax.ema_params(nnx.as_pure(optimizer.opt_state), memory_kind="device")
  hook = ema_jax.flax.SwapEMAWeights()
  hook.on_test_begin(model, optimizer)
  assert _kinds(nnx.as_pure(nnx.state(model, nnx.Param))) == {"device"}
  out = evaluate(model)
  np.testing.assert_allclose(out, x @ expected["kernel"] + expected["bias"], rtol=1e-6)
  hook.on_test_end(model, optimizer)
  assert _kinds(nnx.as_pure(nnx.state(model, nnx.Param))) == {"device"}
  assert_bitwise_equal(jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.Param))), raw)
  step(model, optimizer)  # training goes on, the average in host memory
  assert _kinds(nnx.as_pure(optimizer.opt_state[1].ema)) == {"pinned_host"}
  exported = ema_jax.flax.export_ema(model, optimizer)
  assert _kinds(nnx.as_pure(nnx.state(exported, nnx.Param))) == {"device"}


# ------------------------------------------------------------- complex params


def test_complex_params_are_averaged_as_complex_everywhere():
  params = {"z": jnp.asarray([1 + 2j, 3 - 1j], jnp.complex64), "r": jnp.ones(2)}
  new = {"z": jnp.asarray([-1 + 0j, 2 + 4j], jnp.complex64), "r": jnp.zeros(2)}
  zero = jax.tree.map(jnp.zeros_like, params)
  for tx, read in (
      (ema_jax.ema(0.25), lambda s: ema_jax.ema_params(s)),
      (ema_jax.multi_ema([0.25, 0.5]), lambda s: ema_jax.ema_params(s, index=0)),
  ):
    state = tx.init(params)
    _, state = jax.jit(tx.update)(zero, state, new)
    got = read(state)["z"]
    assert got.dtype == jnp.complex64
    want = 0.25 * np.asarray(params["z"], np.complex128) + 0.75 * np.asarray(new["z"], np.complex128)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  state = ema_jax.ema(0.25).init(params)
  _, state = ema_jax.ema(0.25).update(zero, state, new)
  ema_weights, swapped = ema_jax.swap(new, state)
  assert ema_weights["z"].dtype == jnp.complex64
  np.testing.assert_allclose(
      np.asarray(ema_jax.blend(new, state, 1.0)["z"]), np.asarray(ema_weights["z"]))


@pytest.mark.parametrize("ema_dtype", [jnp.float32, jnp.bfloat16])
def test_a_real_ema_dtype_for_complex_params_is_refused_at_init(ema_dtype):
  params = {"w": jnp.ones(2), "z": jnp.ones(2, jnp.complex64)}
  with pytest.raises(ValueError, match=r"Leaf \['z'\] is complex64.*imaginary"):
    ema_jax.ema(0.9, ema_dtype=ema_dtype).init(params)
  # Excluded by the mask, it is not averaged at all.
  tx = ema_jax.ema(0.9, ema_dtype=ema_dtype, mask={"w": True, "z": False})
  assert tx.init(params).ema["z"] is None
  with pytest.raises(ValueError, match=r"Leaf \['w'\] is float32.*complex"):
    ema_jax.ema(0.9, ema_dtype=jnp.complex64).init(params)


# ---------------------------------------------------------- reset restarts


@pytest.mark.parametrize("options", [
    {}, {"debias": True}, {"update_every": 2}, {"debias": True, "update_every": 2},
    {"ema_dtype": jnp.bfloat16, "rounding": "stochastic"},
    {"memory_kind": "pinned_host"},
], ids=lambda o: "-".join(map(str, o)) or "plain")
@pytest.mark.parametrize("after", [0, 3])
def test_reset_restarts_the_average_under_every_option(options, after):
  tx = ema_jax.ema(0.5, **options)
  params = jnp.asarray([1.0, -1.0])
  state = tx.init(params)
  for _ in range(after):
    _, state = tx.update(jnp.zeros(2), state, params + 5.0)
  restart = jnp.asarray([8.0, 4.0])
  state = ema_jax.reset(state, restart)
  np.testing.assert_array_equal(np.asarray(ema_jax.ema_params(state), np.float32), restart)
  target = jnp.asarray([0.0, 2.0])
  k = options.get("update_every", 1)
  for _ in range(k):  # the next averaging update
    _, state = tx.update(jnp.zeros(2), state, target)
  keep = 0.5 ** k
  np.testing.assert_allclose(
      np.asarray(ema_jax.ema_params(state), np.float64),
      keep * np.asarray(restart, np.float64) + (1 - keep) * np.asarray(target, np.float64),
      rtol=1e-2 if "rounding" in options else 1e-6,
  )


# ------------------------------------------- Keras' overwrite, exactly


@pytest.mark.standard_promotion  # bfloat16 params + float32 updates
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_keras_overwrite_gives_low_precision_params_the_ema_exactly(dtype):
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=4096), dtype)
  tx = optax.chain(optax.sgd(0.3), ema_jax.presets.keras(0.9, ema_overwrite_frequency=3))
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(1, 7):
    grads = jnp.asarray(rng.normal(size=4096), dtype)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert params.dtype == dtype
    if t % 3 == 0:  # overwritten: the EMA (float32) in the params' dtype
      ema = ema_jax.ema_params(state)
      np.testing.assert_array_equal(
          np.asarray(params, np.float32), np.asarray(ema.astype(dtype), np.float32))


def test_keras_overwrite_float32_lands_on_the_nearest_reachable_value():
  rng = np.random.default_rng(1)
  p = np.concatenate([[0.3], rng.normal(size=2000)]).astype(np.float32)
  e = np.concatenate([[-0.001], rng.normal(size=2000) * 1e-3]).astype(np.float32)
  u = np.asarray(ema_jax._engine.overwrite_update(jnp.asarray(p), jnp.zeros_like(jnp.asarray(p)), jnp.asarray(e)))
  landed = p + u
  # Brute force: every float32 update within 8 ulps of e - p.
  first = (e - p).astype(np.float32)
  best = np.full_like(p, np.inf)
  for k in range(-8, 9):
    c = first.copy()
    step = np.inf if k > 0 else -np.inf
    for _ in range(abs(k)):
      c = np.nextafter(c, step).astype(np.float32)
    best = np.minimum(best, np.abs((p + c).astype(np.float64) - e))
  np.testing.assert_array_equal(np.abs(landed.astype(np.float64) - e), best)
  assert landed[0] != e[0]  # 0.3 + u == -0.001 has no float32 solution


# ---------------------------------------- errors early, by name and argument


def test_a_64_bit_ema_dtype_without_x64_is_refused_when_built():
  assert not jax.config.jax_enable_x64
  with pytest.raises(ValueError, match="`ema_dtype=float64` needs 64-bit JAX.*jax_enable_x64"):
    ema_jax.ema(0.9, ema_dtype=jnp.float64)
  with pytest.raises(ValueError, match="complex128"):
    ema_jax.multi_ema([0.9], ema_dtype=jnp.complex128)


@pytest.mark.parametrize("seed", [2**70, -(2**70)])
def test_a_seed_out_of_range_is_named(seed):
  with pytest.raises(ValueError, match="`key`: the seed"):
    ema_jax.ema(0.9, ema_dtype=jnp.bfloat16, rounding="stochastic", key=seed)


@pytest.mark.parametrize("preset", ["timm", "diffusers"])
def test_update_after_step_at_the_int32_limit_is_refused_when_built(preset):
  with pytest.raises(ValueError, match=r"`update_after_step` must be in \[0, 2147483646\]"):
    getattr(ema_jax.presets, preset)(0.9, update_after_step=2**31 - 1)
  tx = getattr(ema_jax.presets, preset)(0.9, update_after_step=2**31 - 2)
  _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
  np.testing.assert_array_equal(ema_jax.ema_params(state), [1.0, 1.0])  # copies


def test_apply_updates_and_average_takes_python_float_leaves():
  params, ema = {"a": 1.0, "b": jnp.ones(2)}, {"a": 3.0, "b": jnp.ones(2)}
  new_params, new_ema = ema_jax.apply_updates_and_average(
      params, {"a": 1.0, "b": jnp.ones(2)}, ema, 0.5)
  np.testing.assert_array_equal(new_params["a"], 2.0)
  np.testing.assert_array_equal(new_ema["a"], 2.5)


def test_numpy_float64_params_are_taken_as_jax_takes_them():
  # With x64 off JAX holds them as float32, and so does the EMA: no message
  # about a changed dtype.
  tx = ema_jax.ema(0.5)
  params = {"w": np.asarray([1.0, 2.0])}
  state = tx.init(params)
  _, state = tx.update({"w": np.asarray([2.0, 2.0])}, state, params)
  np.testing.assert_array_equal(ema_jax.ema_params(state)["w"], [2.0, 3.0])


def test_a_container_change_under_jit_names_both_structures():
  tx = ema_jax.ema(0.9)
  state = tx.init([jnp.ones(2), jnp.ones(2)])
  params = (jnp.ones(2), jnp.ones(2))
  for call in (lambda: jax.jit(tx.update)(params, state, params),
               lambda: jax.jit(ema_jax.swap)(params, state)):
    with pytest.raises(ValueError, match=r"other containers: params are PyTreeDef\(\(\*, \*\)\)"):
      call()


def test_docstrings_name_the_exception_training_while_swapped_raises():
  for fn in (ema_jax.flax.TrainState.apply_gradients, ema_jax.flax.Optimizer.update):
    assert "RuntimeError" not in fn.__doc__ and "ValueError: wh" in fn.__doc__
