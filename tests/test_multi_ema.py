"""multi_ema: several EMAs stacked on a leading axis, picked with `index`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import ema_jax


def _params():
  return {
      "w": jnp.array([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]], jnp.float32),
      "b": jnp.array([0.1, 0.2], jnp.bfloat16),
      "n": jnp.array(7, jnp.int32),
  }


def _grads(k):
  return {
      "w": jnp.full((2, 3), 0.1 * (k + 1), jnp.float32) * jnp.array([1, -1, 2]),
      "b": jnp.array([0.3, -0.1], jnp.bfloat16) * (k % 3),
      "n": np.zeros((), jax.dtypes.float0),
  }


def _run(tx, steps):
  """`tx` alone (the EMA passes updates through): `_grads` are the updates."""
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for k in range(steps):
    updates, state = update(_grads(k), state, params)
    params = {
        "w": params["w"] + updates["w"],
        "b": (params["b"] + updates["b"]).astype(jnp.bfloat16),
        "n": params["n"],
    }
  return params, state


DECAYS = [0.9, ema_jax.warmup_decay(0.99), ema_jax.power_decay(sigma_rel=0.1)]


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("start_step,update_every", [(0, 1), (2, 3)])
def test_each_average_is_bitwise_the_single_ema(start_step, update_every):
  multi = ema_jax.multi_ema(
      DECAYS, start_step=start_step, update_every=update_every
  )
  _, multi_state = _run(multi, 11)
  for i, decay in enumerate(DECAYS):
    single = ema_jax.ema(
        decay, start_step=start_step, update_every=update_every
    )
    _, single_state = _run(single, 11)
    got = ema_jax.ema_params(multi_state, index=i)
    want = ema_jax.ema_params(single_state)
    for key in want:
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_matches_the_recurrence_written_out_in_numpy():
  decays = [0.5, 0.9, 0.99]
  tx = ema_jax.multi_ema(decays)
  rng = np.random.default_rng(0)
  traj = rng.normal(size=(20, 4)).astype(np.float32)
  params = jnp.asarray(traj[0])
  state = tx.init(params)
  expected = np.stack([traj[0].astype(np.float64)] * 3)
  for p in traj[1:]:
    # `updates` of zero: the average sees `params` itself.
    _, state = tx.update(jnp.zeros(4), state, jnp.asarray(p))
    d = np.asarray(decays)[:, None]
    expected = d * expected + (1 - d) * p
  np.testing.assert_allclose(np.asarray(state.ema), expected, rtol=1e-5)


def test_stacking_dtypes_carried_and_masked_leaves():
  params = _params()
  params["frozen"] = jnp.ones(4)
  tx = ema_jax.multi_ema(
      [0.9, 0.99], mask={"w": True, "b": True, "n": True, "frozen": False}
  )
  state = tx.init(params)
  assert state.ema["w"].shape == (2, 2, 3) and state.ema["w"].dtype == jnp.float32
  # bfloat16 params get float32 averages, as with `ema`.
  assert state.ema["b"].shape == (2, 2) and state.ema["b"].dtype == jnp.float32
  assert state.ema["n"].shape == () and state.ema["n"].dtype == jnp.int32
  assert state.ema["frozen"] is None
  params2 = dict(params, n=jnp.array(9, jnp.int32))
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params2), state, params2)
  assert int(ema_jax.ema_params(state, index=1)["n"]) == 9
  assert ema_jax.ema_params(state, index=1)["frozen"] is None


def test_index_is_required_and_checked():
  tx = optax.chain(optax.adam(1e-3), ema_jax.multi_ema([0.9, 0.99]))
  state = tx.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="pass `index=i`"):
    ema_jax.ema_params(state)
  with pytest.raises(ValueError, match="out of range.*2 averages"):
    ema_jax.ema_params(state, index=2)
  with pytest.raises(ValueError, match="pass `index=i`"):
    ema_jax.swap({"w": jnp.zeros(2)}, state)
  single = optax.chain(optax.adam(1e-3), ema_jax.ema(0.9)).init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="single EMA; drop `index`"):
    ema_jax.ema_params(single, index=0)
  with pytest.raises(ValueError, match="single EMA; drop `index`"):
    ema_jax.swap({"w": jnp.zeros(2)}, single, index=0)


def test_bad_decays_fail_when_built_naming_the_entry():
  with pytest.raises(ValueError, match="empty"):
    ema_jax.multi_ema([])
  with pytest.raises(ValueError, match=r"decays\[1\]"):
    ema_jax.multi_ema([0.9, 1.5])
  with pytest.raises(TypeError, match="sequence"):
    ema_jax.multi_ema(0.9)  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="`ema_dtype` must be one of"):
    ema_jax.multi_ema([0.9], ema_dtype=jnp.int32)


def test_state_from_other_decays_count_is_refused():
  params = {"w": jnp.zeros(3)}
  state = ema_jax.multi_ema([0.9, 0.99]).init(params)
  with pytest.raises(ValueError, match=r"\['w'\].*2 stacked averages.*3 decays"):
    ema_jax.multi_ema([0.9, 0.99, 0.999]).update(params, state, params)


def _bits(tree):
  return [
      (np.asarray(x).dtype.str, np.asarray(x).tobytes()) if x is not None else None
      for x in jax.tree.leaves(tree, is_leaf=lambda x: x is None)
  ]


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_swap_twice_is_bit_exact_and_swapped_state_refuses_update():
  tx = ema_jax.multi_ema(
      [0.5, 0.9, 0.99], mask=lambda p: {"w": True, "b": False, "n": True}
  )
  params, state = _run(tx, 5)
  for index in range(3):
    ema_w, swapped = ema_jax.swap(params, state, index=index)
    assert isinstance(swapped, ema_jax.SwappedMultiEmaState)
    want = ema_jax.ema_params(state, index=index)
    np.testing.assert_array_equal(ema_w["w"], want["w"])
    assert ema_w["b"] is params["b"]  # masked: stays in params
    with pytest.raises(ValueError, match="Swap back first"):
      tx.update(_grads(0), swapped, ema_w)
    with pytest.raises(ValueError, match="swapped"):
      ema_jax.ema_params(swapped, index=index)
    with pytest.raises(ValueError, match=r"but average \d is swapped in"):
      ema_jax.swap(ema_w, swapped, index=(index + 1) % 3)
    back, restored = jax.jit(ema_jax.swap)(ema_w, swapped)
    assert isinstance(restored, ema_jax.MultiEmaState)
    assert _bits(back) == _bits(params)
    assert _bits(restored) == _bits(state)
  # A swapped state has another tree structure: a checkpoint of it cannot be
  # restored into an unswapped template.
  assert jax.tree.structure(swapped) != jax.tree.structure(state)


def test_swap_finds_the_multi_state_among_others_with_which():
  params = {"w": jnp.arange(3.0)}
  tx = optax.chain(ema_jax.ema(0.9), ema_jax.multi_ema([0.5, 0.7]))
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(3)}, state, params)
  w = np.arange(3.0)
  np.testing.assert_allclose(
      ema_jax.ema_params(state, index=1, which=1)["w"], w + 0.3, rtol=1e-6
  )
  np.testing.assert_allclose(
      ema_jax.ema_params(state, which=0)["w"], w + 0.1, rtol=1e-6
  )
  ema_w, swapped = ema_jax.swap(params, state, which=1, index=0)
  np.testing.assert_allclose(ema_w["w"], w + 0.5, rtol=1e-6)
  back, again = ema_jax.swap(ema_w, swapped, which=1)
  assert _bits(back) == _bits(params) and _bits(again) == _bits(state)


def test_jitted_update_compiles_once():
  tx = ema_jax.multi_ema([0.9, ema_jax.power_decay(gamma=7.0)], update_every=2)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(state, params):
    traces.append(None)
    return tx.update(params, state, params)[1]

  for _ in range(4):
    state = step(state, params)
  assert len(traces) == 1
  assert int(state.count) == 4


def _mesh():
  return jax.make_mesh(
      (4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )


@pytest.mark.parametrize("jit_init", [False, True])
def test_stacked_leaves_are_sharded_like_the_params_on_trailing_axes(jit_init):
  mesh = _mesh()
  params = {
      "w": jax.device_put(jnp.ones((8, 6)), NamedSharding(mesh, P("data", "model"))),
      "b": jax.device_put(jnp.ones(6), NamedSharding(mesh, P("model"))),
  }
  tx = optax.chain(optax.sgd(0.1), ema_jax.multi_ema([0.9, 0.99, 0.999]))
  state = jax.jit(tx.init)(params) if jit_init else tx.init(params)
  want = {"w": P(None, "data", "model"), "b": P(None, "model")}

  def check(state):
    ema = state[1].ema
    for key, spec in want.items():
      sharding = ema[key].sharding
      assert isinstance(sharding, NamedSharding), key
      assert sharding.mesh == mesh
      assert sharding.spec == spec, (key, sharding.spec)
      shard = ema[key].addressable_shards[0].data
      assert shard.shape == (3, *params[key].addressable_shards[0].data.shape)

  check(state)
  updates, state = jax.jit(tx.update)(params, state, params)
  check(state)
  ema_w, swapped = ema_jax.swap(params, state, index=2)
  assert ema_w["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
