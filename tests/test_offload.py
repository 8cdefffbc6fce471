"""Host offload: `ema(memory_kind='pinned_host')` keeps the EMA in host memory.

JAX's CPU backend exposes a 'pinned_host' memory next to each device, so the
placement, the in-step transfers and the memory accounting are checked here on
the 8 CPU devices of conftest.py, sharded on a 2x4 mesh.

Run as a script (`python tests/test_offload.py`) it prints the memory table of
docs/sharding.md.
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
from _util import assert_bitwise_equal

HOST = "pinned_host"
BF16 = jnp.bfloat16

_COLLECTIVE = re.compile(
    r"\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
    r"(?:-start)?\("
)
# An entry parameter or result in XLA's layout syntax: `f32[512,128]{1,0:S(5)}`
# (scalars: `s32[]`); S(5) is the host memory space.
_SHAPE = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\](?:\{([^}]*)\})?")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def make_mesh(axis_type=AxisType.Auto):
  return jax.make_mesh((2, 4), ("data", "model"), (axis_type, axis_type))


def make_params(mesh, scale=1):
  rng = np.random.default_rng(0)
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  return {
      "w1": put(jnp.asarray(rng.normal(size=(64 * scale, 32 * scale)), jnp.float32), P("data", "model")),
      "w2": put(jnp.asarray(rng.normal(size=(32 * scale, 16)), jnp.float32), P("model", None)),
      "b": put(jnp.asarray(rng.normal(size=(16,)), jnp.float32), P()),
      "emb": put(jnp.asarray(rng.normal(size=(8, 32 * scale)), BF16), P(None, "model")),
      "step": put(jnp.arange(8, dtype=jnp.int32), P("model")),
  }


def grads_for(params, i):
  return jax.tree.map(
      lambda p: (jnp.zeros_like(p) if p.dtype == jnp.int32
                 else jnp.full_like(p, 0.1 * (i + 1)) * jnp.sign(p)),
      params,
  )


def make_step(tx):
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def assert_placed(ema_tree, params, memory_kind):
  for (path, p), e in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ema_tree)
  ):
    where = jax.tree_util.keystr(path)
    # The averages are placed; carried leaves stay where the params are.
    kind = memory_kind if ema_jax._leaves.is_float(e) else p.sharding.memory_kind
    assert e.sharding.memory_kind == kind, where
    assert e.sharding.is_equivalent_to(
        p.sharding.with_memory_kind(kind), p.ndim
    ), (where, e.sharding, p.sharding)


def as_np(tree):
  return [np.asarray(x.astype(jnp.float32) if x.dtype == BF16 else x)
          for x in jax.tree.leaves(tree)]


def test_cpu_exposes_pinned_host():
  kinds = [m.kind for m in jax.devices()[0].addressable_memories()]
  assert HOST in kinds


def test_options_are_checked():
  with pytest.raises(ValueError, match="`memory_kind`"):
    ema_jax.ema(0.9, memory_kind="hbm")
  state = ema_jax.ema(0.9).init(jnp.ones(2))
  with pytest.raises(ValueError, match="`memory_kind`"):
    ema_jax.ema_params(state, memory_kind="host")
  with pytest.raises(ValueError, match="`memory_kind`"):
    ema_jax.swap(jnp.ones(2), state, memory_kind="host")


TRANSFORMS = {
    "f32": dict(),
    "bf16_stochastic": dict(ema_dtype=BF16, rounding="stochastic", key=5),
}


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_ema_stays_in_host_memory_and_equals_the_device_ema(axis_type, name):
  mesh = make_mesh(axis_type)
  params = make_params(mesh)
  kw = TRANSFORMS[name]
  host_tx = optax.chain(optax.adam(1e-2), ema_jax.ema(0.9, memory_kind=HOST, **kw))
  dev_tx = optax.chain(optax.adam(1e-2), ema_jax.ema(0.9, **kw))

  host_state = jax.jit(host_tx.init)(params)
  assert_placed(ema_jax.ema_params(host_state), params, HOST)
  with jax.set_mesh(mesh):
    assert_placed(ema_jax.ema_params(host_tx.init(params)), params, HOST)
  dev_state = jax.jit(dev_tx.init)(params)
  assert_placed(ema_jax.ema_params(dev_state), params, "device")

  host_step = jax.jit(make_step(host_tx))
  dev_step = jax.jit(make_step(dev_tx))
  p_host = p_dev = params
  for i in range(3):
    p_host, host_state = host_step(p_host, host_state, grads_for(params, i))
    p_dev, dev_state = dev_step(p_dev, dev_state, grads_for(params, i))
    assert_placed(ema_jax.ema_params(host_state), params, HOST)
    assert_placed(p_host, params, "device")
  # Transfers are exact and the arithmetic is the same: bit-identical.
  assert_bitwise_equal(ema_jax.ema_params(host_state), ema_jax.ema_params(dev_state))
  # ...and the average did move away from the initial params.
  assert not np.array_equal(
      as_np(ema_jax.ema_params(host_state))[0], as_np(params)[0]
  )


def per_device_nbytes(tree, floats_only=False):
  return sum(
      x.addressable_shards[0].data.nbytes
      for x in jax.tree.leaves(tree)
      if not floats_only or jnp.issubdtype(x.dtype, jnp.floating)
  )


def collectives(compiled):
  return collections.Counter(m.group(1) for m in _COLLECTIVE.finditer(compiled.as_text()))


def entry_layout_bytes(compiled):
  """Bytes per device of the entry's (parameters, results), split (device, host)."""
  text = compiled.as_text()
  start = text.index("entry_computation_layout={") + len("entry_computation_layout={")
  depth, end = 1, start
  while depth:
    depth += {"{": 1, "}": -1}.get(text[end], 0)
    end += 1
  params_part, results_part = text[start:end - 1].split(")->")
  out = []
  for part in (params_part, results_part):
    device = host = 0
    for dtype, dims, tile in _SHAPE.findall(part):
      n = _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
      if "S(5)" in tile:
        host += n
      else:
        device += n
    out.append((device, host))
  return out


def step_memory(tx, params):
  """Per-device bytes of one donated training step, from XLA's memory analysis.

  The CPU runtime reports host and device buffers together in
  `memory_analysis()`; the host part is the buffers XLA's layout places in
  the host memory space, S(5).
  """
  opt_state = jax.jit(tx.init)(params)
  compiled = (
      jax.jit(make_step(tx), donate_argnums=(0, 1))
      .lower(params, opt_state, grads_for(params, 0))
      .compile()
  )
  stats = compiled.memory_analysis()
  (arg_device, arg_host), _ = entry_layout_bytes(compiled)
  assert arg_device + arg_host == stats.argument_size_in_bytes
  if stats.host_argument_size_in_bytes:  # runtimes that report it (GPU, TPU)
    arg_host = stats.host_argument_size_in_bytes
    arg_device = stats.argument_size_in_bytes
  return {
      "device_arguments": arg_device,
      "host_arguments": arg_host,
      "temp": stats.temp_size_in_bytes,
      "collectives": collectives(compiled),
  }


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_compiled_step_keeps_ema_in_host_memory_without_collectives():
  mesh = make_mesh()
  params = make_params(mesh)
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9, memory_kind=HOST))
  opt_state = jax.jit(tx.init)(params)
  compiled = (
      jax.jit(make_step(tx), donate_argnums=(0, 1))
      .lower(params, opt_state, grads_for(params, 0))
      .compile()
  )
  assert collectives(compiled) == {}
  (_, arg_host), (_, out_host) = entry_layout_bytes(compiled)
  ema = ema_jax.ema_params(opt_state)
  # The EMA is float32 for the bfloat16 leaf, like the others.
  assert per_device_nbytes(ema) > per_device_nbytes(params)
  # Every average comes out in host memory; the carried int leaf stays in
  # device memory, where its param is.
  assert out_host == per_device_nbytes(ema, floats_only=True)
  assert arg_host == per_device_nbytes(ema, floats_only=True)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_offload_removes_the_ema_from_device_memory(name):
  mesh = make_mesh()
  params = make_params(mesh, scale=4)
  kw = TRANSFORMS[name]
  base = step_memory(optax.sgd(0.1), params)
  on_device = step_memory(optax.chain(optax.sgd(0.1), ema_jax.ema(0.9, **kw)), params)
  offloaded = step_memory(
      optax.chain(optax.sgd(0.1), ema_jax.ema(0.9, memory_kind=HOST, **kw)), params
  )
  state = jax.jit(ema_jax.ema(0.9, **kw).init)(params)
  # Inputs only: the int leaf's old EMA is never read, so jit drops it.
  ema_bytes = per_device_nbytes(state.ema, floats_only=True)
  scalars = 4 + (8 if "rounding" in kw else 0)  # count, and the key's 2 x uint32
  assert base["host_arguments"] == 0 and on_device["host_arguments"] == 0
  assert on_device["device_arguments"] == base["device_arguments"] + ema_bytes + scalars
  assert offloaded["device_arguments"] == base["device_arguments"] + scalars
  assert offloaded["host_arguments"] == ema_bytes
  for m in (base, on_device, offloaded):
    assert m["collectives"] == {}


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_swap_and_ema_params_bring_the_ema_to_device(axis_type):
  mesh = make_mesh(axis_type)
  params = make_params(mesh)
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.5, memory_kind=HOST))
  opt_state = jax.jit(tx.init)(params)
  step = jax.jit(make_step(tx))
  for i in range(2):
    params, opt_state = step(params, opt_state, grads_for(params, i))
  ema_host = ema_jax.ema_params(opt_state)
  assert_placed(ema_host, params, HOST)
  assert_placed(ema_jax.ema_params(opt_state, memory_kind="device"), params, "device")
  assert_placed(
      jax.jit(lambda s: ema_jax.ema_params(s, memory_kind="device"))(opt_state),
      params, "device",
  )

  for swap in (ema_jax.swap, jax.jit(ema_jax.swap, static_argnames="memory_kind")):
    ema_weights, swapped = swap(params, opt_state, memory_kind="device")
    assert_placed(ema_weights, params, "device")  # ready to evaluate
    assert_placed(swapped[1].raw_params, params, HOST)  # training params wait
    assert_bitwise_equal(ema_weights, ema_host)
    back, unswapped = swap(ema_weights, swapped, memory_kind="device")
    assert_placed(back, params, "device")
    assert_placed(ema_jax.ema_params(unswapped), params, HOST)
    assert_bitwise_equal(back, params)
    assert_bitwise_equal(ema_jax.ema_params(unswapped), ema_host)

  # Without memory_kind, each leaf goes where the one it replaces was: the
  # EMA to the device, the training params to host memory, and back.
  ema_weights, swapped = ema_jax.swap(params, opt_state)
  assert_placed(ema_weights, params, "device")
  assert_placed(swapped[1].raw_params, params, HOST)
  back, unswapped = ema_jax.swap(ema_weights, swapped)
  assert_placed(back, params, "device")
  assert_bitwise_equal((back, unswapped), (params, opt_state))
  # Asked for, the EMA comes out in host memory, as it is.
  ema_weights, _ = ema_jax.swap(params, opt_state, memory_kind=HOST)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(ema_weights)} == {HOST}


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_swapped_eval_step_with_offloaded_ema():
  mesh = make_mesh()
  params = make_params(mesh)
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.5, memory_kind=HOST))
  opt_state = jax.jit(tx.init)(params)
  params, opt_state = jax.jit(make_step(tx))(params, opt_state, grads_for(params, 0))

  def loss(p):
    return jnp.sum(p["w1"] ** 2) + jnp.sum(p["w2"] ** 2) + jnp.sum(p["emb"].astype(jnp.float32))

  @jax.jit
  def eval_step(params, opt_state):
    ema_weights, opt_state = ema_jax.swap(params, opt_state, memory_kind="device")
    value = loss(ema_weights)
    params, opt_state = ema_jax.swap(ema_weights, opt_state, memory_kind="device")
    return value, params, opt_state

  value, params_back, state_back = eval_step(params, opt_state)
  expected = loss(ema_jax.ema_params(opt_state, memory_kind="device"))
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  assert abs(float(expected) - float(loss(params))) > 1e-3
  assert_placed(params_back, params, "device")
  assert_placed(ema_jax.ema_params(state_back), params, HOST)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_update_every_does_its_work_only_on_averaging_steps():
  mesh = make_mesh()
  params = make_params(mesh)
  host_tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9, memory_kind=HOST, update_every=3))
  dev_tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9, update_every=3))
  host_state, dev_state = jax.jit(host_tx.init)(params), jax.jit(dev_tx.init)(params)
  compiled = (
      jax.jit(make_step(host_tx))
      .lower(params, host_state, grads_for(params, 0))
      .compile()
  )
  # The averaging and its transfers sit in a branch taken every 3rd step.
  assert re.search(r"\sconditional\(", compiled.as_text())
  assert collectives(compiled) == {}
  host_step, dev_step = jax.jit(make_step(host_tx)), jax.jit(make_step(dev_tx))
  p_host = p_dev = params
  previous = as_np(ema_jax.ema_params(host_state))
  for i in range(6):
    p_host, host_state = host_step(p_host, host_state, grads_for(params, i))
    p_dev, dev_state = dev_step(p_dev, dev_state, grads_for(params, i))
    now = as_np(ema_jax.ema_params(host_state))
    floats = [k for k, x in enumerate(jax.tree.leaves(params)) if x.dtype != jnp.int32]
    moved = [not np.array_equal(now[k], previous[k]) for k in floats]
    assert all(moved) if i % 3 == 2 else not any(moved), (i, moved)
    previous = now
    assert_placed(ema_jax.ema_params(host_state), params, HOST)
  assert_bitwise_equal(ema_jax.ema_params(host_state), ema_jax.ema_params(dev_state))


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_orbax_round_trip_keeps_host_placement_and_key(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  mesh = make_mesh()
  params = make_params(mesh)
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(
      0.9, ema_dtype=BF16, rounding="stochastic", memory_kind=HOST))
  opt_state = jax.jit(tx.init)(params)
  params, opt_state = jax.jit(make_step(tx))(params, opt_state, grads_for(params, 0))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", opt_state)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state)
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  checkpointer.close()
  assert_placed(ema_jax.ema_params(restored), params, HOST)
  assert_bitwise_equal(restored, opt_state)  # the rounding key included


def memory_table():
  """The docs/sharding.md table: per-parameter bytes, from XLA's analysis of a step."""
  mesh = make_mesh()
  f32 = {k: v for k, v in make_params(mesh, scale=8).items() if k not in ("step", "emb")}
  bf16 = jax.tree.map(lambda x: x.astype(BF16), f32)
  n_dev = sum(p.addressable_shards[0].data.size for p in jax.tree.leaves(f32))
  sr = dict(ema_dtype=BF16, rounding="stochastic")
  rows = [
      ("float32 params, `ema(d)`", f32, {}),
      ("bfloat16 params, `ema(d)` (float32 average)", bf16, {}),
      ("`ema(d, ema_dtype=jnp.bfloat16)` (stalls)", f32, dict(ema_dtype=BF16)),
      ("`ema(d, ema_dtype=jnp.bfloat16, rounding='stochastic')`", f32, sr),
      ("`ema(d, memory_kind='pinned_host')`", f32, dict(memory_kind=HOST)),
      ("`ema(d, ..., rounding='stochastic', memory_kind='pinned_host')`", f32,
       dict(memory_kind=HOST, **sr)),
  ]
  print(f"{n_dev} params per device on a 2x4 mesh; bytes per parameter")
  print("| EMA | device | host | device temp |")
  print("|---|---|---|---|")
  for name, params, kw in rows:
    base = step_memory(optax.sgd(0.1), params)
    m = step_memory(optax.chain(optax.sgd(0.1), ema_jax.ema(0.999, **kw)), params)
    extra = (m["device_arguments"] - base["device_arguments"]) / n_dev
    temp = (m["temp"] - base["temp"]) / n_dev
    print(f"| {name} | {extra:.2f} | {m['host_arguments'] / n_dev:.2f} | {temp:.2f} |")


if __name__ == "__main__":
  memory_table()


def test_multi_ema_average_read_from_host_memory():
  # Picking average i of a stacked host-memory leaf is a static slice: an
  # indexed gather would put the index in device memory and fail eagerly.
  mesh = make_mesh()
  params = make_params(mesh)
  state = ema_jax.multi_ema([0.5, 0.9], memory_kind=HOST).init(params)
  for read in (ema_jax.ema_params,
               jax.jit(ema_jax.ema_params, static_argnames="index")):
    ema = read(state, index=1)
    assert_placed(ema, params, HOST)
    assert_bitwise_equal(ema, jax.tree.map(
        lambda p: p.astype(jnp.float32) if p.dtype == BF16 else p, params))
