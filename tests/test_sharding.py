"""The EMA is sharded exactly like the params, and costs no communication.

On the 8 CPU devices that conftest.py provides, as a 2x4 ('data', 'model')
mesh, with FSDP-style, tensor-parallel and mixed partition specs and a
replicated leaf, under both of JAX's sharding modes (auto: XLA propagates
shardings; explicit: shardings are part of the types).
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import ema_jax
from ema_jax import _compat
from _util import assert_bitwise_equal

_COLLECTIVE = re.compile(
    r"\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
    r"(?:-start)?\("
)

SPECS = {
    "fsdp": ((16, 12), P("data", None)),  # FSDP: params split over data
    "tp_col": ((12, 16), P(None, "model")),  # tensor parallel, column split
    "tp_row": ((16, 12), P("model", None)),  # tensor parallel, row split
    "mixed": ((8, 16), P("data", "model")),  # 2-D: FSDP x tensor parallel
    "mixed_t": ((16, 8), P("model", "data")),
    "replicated": ((5,), P()),
    "stacked": ((3, 8, 4), P(None, "data", "model")),  # scanned layers
}


def collectives(compiled: jax.stages.Compiled) -> collections.Counter:
  return collections.Counter(m.group(1) for m in _COLLECTIVE.finditer(compiled.as_text()))


def make_mesh(axis_type: AxisType) -> jax.sharding.Mesh:
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))


def make_params(mesh: jax.sharding.Mesh, dtype=jnp.float32) -> dict:
  rng = np.random.default_rng(0)
  params = {}
  for name, (shape, spec) in SPECS.items():
    value = rng.normal(size=shape).astype(np.float32)
    params[name] = jax.device_put(
        jnp.asarray(value, dtype), NamedSharding(mesh, spec)
    )
  params["bf16"] = jax.device_put(
      jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16),
      NamedSharding(mesh, P("model", "data")),
  )
  params["step"] = jax.device_put(
      jnp.arange(8, dtype=jnp.int32), NamedSharding(mesh, P("model"))
  )
  return params


def grads_like(params: dict, seed: int) -> dict:
  def grad(path, p):
    if not jnp.issubdtype(p.dtype, jnp.floating):
      return jnp.zeros_like(p)
    g = jax.random.normal(jax.random.fold_in(jax.random.key(seed), len(path)), p.shape)
    return jax.device_put(g.astype(p.dtype), p.sharding)

  return jax.tree_util.tree_map_with_path(grad, params)


def assert_same_sharding(ema_tree, params):
  memory_kind = jax.devices()[0].default_memory().kind  # 'device' since jax 0.7
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  ema_leaves = jax.tree.leaves(ema_tree)
  assert len(ema_leaves) == len(flat)
  for (path, p), e in zip(flat, ema_leaves):
    where = jax.tree_util.keystr(path)
    assert isinstance(e.sharding, NamedSharding), where
    assert e.sharding.mesh == p.sharding.mesh, where
    assert e.sharding.is_equivalent_to(p.sharding, p.ndim), (
        where, e.sharding.spec, p.sharding.spec)
    assert e.sharding.memory_kind == memory_kind, where
    # Each device holds the same slice of the EMA as of the params.
    p_index = {s.device: s.index for s in p.addressable_shards}
    for shard in e.addressable_shards:
      assert shard.index == p_index[shard.device], where


TRANSFORMS = {
    "ema": lambda: ema_jax.ema(0.99),
    "debias_every3": lambda: ema_jax.ema(
        ema_jax.warmup_decay(0.999), debias=True, update_every=3
    ),
    "bf16_stochastic": lambda: ema_jax.ema(
        0.999, ema_dtype=jnp.bfloat16, rounding="stochastic", key=1
    ),
    "keras": lambda: ema_jax.presets.keras(0.99, ema_overwrite_frequency=2),
}

AXIS_TYPES = [AxisType.Auto, AxisType.Explicit]


def make_step(tx):
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_sharded_like_params_and_no_collectives(axis_type, name):
  mesh = make_mesh(axis_type)
  params = make_params(mesh)
  # sgd is elementwise, so any collective in the step would be the EMA's.
  tx = optax.chain(optax.sgd(1e-2), TRANSFORMS[name]())
  init = jax.jit(tx.init).lower(params).compile()
  assert collectives(init) == {}, collectives(init)
  opt_state = init(params)
  assert_same_sharding(ema_jax.ema_params(opt_state), params)
  # Scalars in the state (count, debias norm, key) are replicated on the mesh.
  ema_state = opt_state[1]
  for leaf in [ema_state.count, ema_state.debias_norm, ema_state.rounding_key]:
    if leaf is not None:
      assert leaf.sharding.is_fully_replicated

  grads = grads_like(params, 0)
  step = jax.jit(make_step(tx), donate_argnums=(0, 1))
  compiled = step.lower(params, opt_state, grads).compile()
  assert collectives(compiled) == {}, collectives(compiled)
  for i in range(4):
    params, opt_state = compiled(params, opt_state, grads_like(params, i))
    assert_same_sharding(params, make_params(mesh))  # the step keeps params'
    assert_same_sharding(ema_jax.ema_params(opt_state), params)
  assert int(opt_state[1].count) == 4


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
def test_blend_and_fused_update_with_constants_need_no_collectives(axis_type):
  # A Python alpha or decay is folded into every leaf's update; leaves of one
  # shape and dtype sharded differently ('mixed' and 'bf16''s float32
  # average) must not share it across devices.
  mesh = make_mesh(axis_type)
  params = make_params(mesh)
  ema_tx = optax.chain(optax.sgd(1e-2), ema_jax.ema(0.99))
  opt_state = jax.jit(ema_tx.init)(params)
  blend = jax.jit(lambda p, s: ema_jax.blend(p, s, 0.25))
  compiled = blend.lower(params, opt_state).compile()
  assert collectives(compiled) == {}, collectives(compiled)
  assert_same_sharding(compiled(params, opt_state), params)

  average = jax.jit(ema_jax.ema_params)(opt_state)  # float32, params' shardings
  fused = jax.jit(
      lambda p, u, e: ema_jax.apply_updates_and_average(p, u, e, 0.99)
  )
  grads = grads_like(params, 0)
  compiled = fused.lower(params, grads, average).compile()
  assert collectives(compiled) == {}, collectives(compiled)
  new_params, new_average = compiled(params, grads, average)
  assert_same_sharding(new_params, params)
  assert_same_sharding(new_average, params)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
def test_eager_init_is_sharded_like_params(axis_type):
  mesh = make_mesh(axis_type)
  params = make_params(mesh)
  with _compat.set_mesh(mesh):
    state = ema_jax.ema(0.9, ema_dtype=jnp.bfloat16, rounding="stochastic").init(params)
  assert_same_sharding(state.ema, params)


def test_collective_check_sees_collectives():
  # The check below must be able to fail: a reduction over a sharded leaf
  # needs an all-reduce, and a reshard needs an all-gather or all-to-all.
  mesh = make_mesh(AxisType.Auto)
  x = make_params(mesh)["mixed"]
  assert collectives(jax.jit(jnp.sum).lower(x).compile())["all-reduce"] >= 1
  reshard = jax.jit(
      lambda x: x * 2, out_shardings=NamedSharding(mesh, P("model", "data"))
  )
  assert sum(collectives(reshard.lower(x).compile()).values()) >= 1


def mlp_loss(params, batch):
  """A Megatron-style MLP: column- then row-parallel, batch split over data."""
  x, y = batch
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  # The row-parallel matmul sums over 'model'; explicit mode needs to be told
  # where the result lives, auto mode works it out.
  explicit = AxisType.Explicit in jax.sharding.get_abstract_mesh().axis_types
  out_sharding = P("data", None) if explicit else None
  out = jnp.einsum("bh,ho->bo", h, params["w2"], out_sharding=out_sharding) + params["b2"]
  return jnp.mean((out - y) ** 2)


def mlp_setup(mesh):
  rng = np.random.default_rng(1)
  put = lambda a, spec: jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, spec))
  params = {
      "w1": put(rng.normal(size=(8, 32)) / 3, P(None, "model")),
      "b1": put(np.zeros(32), P("model")),
      "w2": put(rng.normal(size=(32, 4)) / 6, P("model", None)),
      "b2": put(np.zeros(4), P()),
  }
  batch = (
      put(rng.normal(size=(16, 8)), P("data", None)),
      put(rng.normal(size=(16, 4)), P("data", None)),
  )
  return params, batch


def trained_mlp(mesh):
  """Params, optimizer state and batch after 3 steps, with an EMA of decay 0.9."""
  params, batch = mlp_setup(mesh)
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    grads = jax.grad(mlp_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(3):
    params, opt_state = train_step(params, opt_state, batch)
  return params, opt_state, batch


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
def test_swap_and_ema_params_keep_shardings(axis_type):
  mesh = make_mesh(axis_type)
  with _compat.set_mesh(mesh):  # for the model's out_sharding
    params, opt_state, _ = trained_mlp(mesh)
    expected = ema_jax.ema_params(opt_state)
    assert_same_sharding(expected, params)

    for swap in (ema_jax.swap, jax.jit(ema_jax.swap)):
      ema_weights, swapped = swap(params, opt_state)
      assert_same_sharding(ema_weights, params)
      assert_same_sharding(swapped[1].raw_params, params)
      back, unswapped = swap(ema_weights, swapped)
      assert_same_sharding(back, params)
      assert_same_sharding(ema_jax.ema_params(unswapped), params)
      assert_bitwise_equal(back, params)
      assert_bitwise_equal(ema_weights, expected)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
def test_swapped_eval_needs_no_collectives_beyond_the_models(axis_type):
  mesh = make_mesh(axis_type)
  with _compat.set_mesh(mesh):  # for the model's out_sharding
    params, opt_state, batch = trained_mlp(mesh)

    def swapped_eval(params, opt_state, batch):
      ema_weights, opt_state = ema_jax.swap(params, opt_state)
      loss = mlp_loss(ema_weights, batch)
      params, opt_state = ema_jax.swap(ema_weights, opt_state)
      return loss, params, opt_state

    model = collectives(jax.jit(mlp_loss).lower(params, batch).compile())
    assert model["all-reduce"] >= 1  # the row-parallel matmul and the mean
    swapped = jax.jit(swapped_eval).lower(params, opt_state, batch).compile()
    assert collectives(swapped) == model

    loss, params_back, state_back = jax.jit(swapped_eval)(params, opt_state, batch)
    assert_same_sharding(params_back, params)
    assert_same_sharding(ema_jax.ema_params(state_back), params)
    ema_loss = mlp_loss(ema_jax.ema_params(opt_state), batch)
    np.testing.assert_allclose(loss, ema_loss, rtol=1e-6)
    assert abs(float(ema_loss) - float(mlp_loss(params, batch))) > 1e-4
