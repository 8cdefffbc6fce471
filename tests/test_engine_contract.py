"""The engine contract: exact arithmetic, strict argument checks, safe swaps.

Each test is named after one behaviour of the contract the core package follows
(exact decays near 1, dense schedule probing, Python float leaves, refused
non-array leaves, argument types, swap safety, keyword-only `index`,
`ema_jax.is_swapped`, one exception type per mistake, `multi_ema` options,
preset options, EMAs inside `optax.multi_transform` / `optax.masked`). The
references are float64 numpy formulas or exact (bitwise) properties. All code
here is dtype-explicit, so it runs under `jax.numpy_dtype_promotion('strict')`.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_jax
from _util import assert_bitwise_equal

F32 = jnp.float32
BF16 = jnp.bfloat16


# ----------------------------------------------------------------- helpers


def _flat_none(tree: Any) -> tuple[list[Any], Any]:
  return jax.tree_util.tree_flatten(tree, is_leaf=lambda v: v is None)


def _bits(x: Any) -> tuple[bytes, str, tuple[int, ...]]:
  a = np.asarray(x)
  return a.tobytes(), str(a.dtype), a.shape


def assert_bitwise(x: Any, y: Any) -> None:
  """Same structure (None leaves included), dtypes, shapes and bytes."""
  fx, dx = _flat_none(x)
  fy, dy = _flat_none(y)
  assert dx == dy, (dx, dy)
  for a, b in zip(fx, fy):
    if a is None or b is None:
      assert a is None and b is None, (a, b)
      continue
    assert _bits(a) == _bits(b)


def _snapshot(tree: Any) -> Any:
  """A host copy (numpy) of a tree, None leaves kept: survives any donation."""
  return jax.tree.map(
      lambda v: None if v is None else np.array(v, copy=True),
      tree,
      is_leaf=lambda v: v is None,
  )


def _rand(shape: tuple[int, ...], seed: int, dtype: Any = F32) -> jax.Array:
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape).astype(np.float32)).astype(dtype)


def _params(dtype: Any = F32, seed: int = 0) -> dict[str, jax.Array]:
  return {"w": _rand((3, 5), seed, dtype), "b": _rand((5,), seed + 1, dtype)}


def _grads(params: Any, seed: int) -> Any:
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(
      treedef,
      [_rand(p.shape, 1000 * seed + i, p.dtype) for i, p in enumerate(leaves)],
  )


def _train(tx: optax.GradientTransformation, params: Any, steps: int,
           jit: bool = True, seed: int = 0) -> tuple[Any, Any]:
  """`steps` updates of `optax.chain(optax.sgd(0.1), tx)`; (params, state)."""
  opt = optax.chain(optax.sgd(0.1), tx)
  state = opt.init(params)

  def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  if jit:
    step = jax.jit(step)
  for t in range(steps):
    params, state = step(params, state, _grads(params, seed + t))
  return params, state


def _ema64(init: np.ndarray, param_history: list[np.ndarray],
           decay: float) -> np.ndarray:
  e = np.asarray(init, np.float64)
  for p in param_history:
    e = decay * e + (1.0 - decay) * np.asarray(p, np.float64)
  return e


def _masked_node_free(tree: Any) -> bool:
  flat = jax.tree_util.tree_leaves(
      tree, is_leaf=lambda v: v is None or isinstance(v, optax.MaskedNode)
  )
  return not any(isinstance(v, optax.MaskedNode) for v in flat)


def _set_ema_count(state: Any, k: int) -> Any:
  """`state` with the count of its (single) EmaState set to `k`."""
  is_ema = lambda s: isinstance(s, ema_jax.EmaState)  # noqa: E731
  return jax.tree.map(
      lambda s: s._replace(count=jnp.int32(k)) if is_ema(s) else s,
      state,
      is_leaf=is_ema,
  )


def _pinned_host_available() -> bool:
  return "pinned_host" in [
      m.kind for m in jax.devices()[0].addressable_memories()
  ]


# ------------------------------------------- 1. exact decays close to one


def test_decay_near_one_is_exact_in_float32():
  tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.9999999))
  params = {"w": jnp.zeros(4, F32)}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.full(4, -1.0, F32)}, state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(params["w"]), np.ones(4, np.float32))
  got = np.asarray(ema_jax.ema_params(state)["w"]).astype(np.float64)
  want = 1.0 - 0.9999999  # float64: 1e-7 to 1e-16
  assert np.all(np.abs(got - want) / want < 1e-6), (got, want)


def _power_weight64(k: int) -> float:
  gamma = ema_jax.sigma_rel_to_gamma(0.2)
  return float(-np.expm1((gamma + 1.0) * np.log1p(-1.0 / (k + 1.0))))


@pytest.mark.parametrize("k", [20_000_000, 100_000_000])
def test_power_decay_weight_is_accurate_at_large_counts_float32(k):
  tx = ema_jax.ema(ema_jax.power_decay(sigma_rel=0.2))
  params = {"w": jnp.zeros(4, F32)}
  state = tx.init(params)._replace(count=jnp.int32(k))
  _, state = tx.update({"w": jnp.ones(4, F32)}, state, params)
  got = np.asarray(state.ema["w"]).astype(np.float64)
  want = _power_weight64(k)
  assert np.all(np.abs(got - want) / want < 1e-3), (got, want)


@pytest.mark.parametrize("k", [20_000_000, 100_000_000])
def test_power_decay_weight_is_accurate_at_large_counts_float64(k):
  with jax.enable_x64(True):
    tx = ema_jax.ema(ema_jax.power_decay(sigma_rel=0.2))
    params = {"w": jnp.zeros(4, jnp.float64)}
    state = tx.init(params)._replace(count=jnp.int32(k))
    _, state = tx.update({"w": jnp.ones(4, jnp.float64)}, state, params)
    assert state.ema["w"].dtype == jnp.float64
    got = np.asarray(state.ema["w"])
  want = _power_weight64(k)
  assert np.all(np.abs(got - want) / want < 1e-9), (got, want)


# ------------------------------------------------ 2. schedules probed densely


def test_schedule_negative_at_an_unusual_step_is_refused_when_built():
  with pytest.raises(ValueError):
    ema_jax.ema(lambda k: jnp.where(k == 5, -0.5, 0.9))


def test_schedule_above_one_late_in_training_is_refused_when_built():
  with pytest.raises(ValueError):
    ema_jax.ema(lambda k: jnp.where(k > 2_000_000, 1.5, 0.9))


def _schedule_at(count: int, value: float) -> Callable[[jax.Array], jax.Array]:
  return lambda k: jnp.where(k == count, value, 0.9)


@pytest.mark.parametrize("bad", [5.0, math.nan], ids=["five", "nan"])
def test_runtime_bad_decay_cannot_push_average_outside_params_range(bad):
  tx = None
  for count in (1_234_567, 1_234_567_891, 2_000_000_011):
    try:
      tx = ema_jax.ema(_schedule_at(count, bad))
    except ValueError:
      continue  # refusing it when built is allowed: try a rarer step
    break
  if tx is None:
    return  # every candidate refused when built: the contract is met that way

  old = jnp.asarray([-1.0, 0.0, 2.0, 3.0, -0.5, 7.0], F32)
  upd = jnp.asarray([2.0, 1.0, -3.0, 0.0, 0.25, -8.0], F32)
  new_p = np.asarray(old + upd)
  lo, hi = np.minimum(np.asarray(old), new_p), np.maximum(np.asarray(old), new_p)

  # Control: the schedule is evaluated at the count we set (decay 0 copies).
  control = ema_jax.ema(_schedule_at(count, 0.0))
  c_state = control.init({"w": old})._replace(count=jnp.int32(count))
  _, c_state = control.update({"w": upd}, c_state, {"w": old})
  np.testing.assert_array_equal(np.asarray(c_state.ema["w"]), new_p)

  state = tx.init({"w": old})._replace(count=jnp.int32(count))
  for update in (tx.update, jax.jit(tx.update)):
    _, new = update({"w": upd}, state, {"w": old})
    e = np.asarray(new.ema["w"])
    assert np.all(np.isfinite(e)), e
    assert np.all((e >= lo) & (e <= hi)), (e, lo, hi)


# ------------------------------------------------------ 3. Python float leaves


def test_python_float_leaf_is_averaged_swapped_and_read():
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))
  params: Any = {"a": 1.0, "w": jnp.ones(2, F32)}
  state = tx.init(params)

  # A fresh state swaps and swaps back with the Python float in the params.
  ema_w, swapped = ema_jax.swap(params, state)
  back, state_back = ema_jax.swap(ema_w, swapped)
  assert float(back["a"]) == 1.0
  assert_bitwise(back["w"], params["w"])
  assert_bitwise(ema_jax.ema_params(state_back), ema_jax.ema_params(state))

  history_a, history_w = [], []
  for t in range(3):
    grads = {"a": jnp.asarray(0.5 * (t + 1), F32), "w": _rand((2,), t)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history_a.append(np.asarray(params["a"]))
    history_w.append(np.asarray(params["w"]))
  ema = ema_jax.ema_params(state)
  np.testing.assert_allclose(
      np.asarray(ema["a"]).astype(np.float64),
      _ema64(np.float64(1.0), history_a, 0.9), rtol=2e-6,
  )
  np.testing.assert_allclose(
      np.asarray(ema["w"]).astype(np.float64),
      _ema64(np.ones(2), history_w, 0.9), rtol=2e-6,
  )
  before = _snapshot(ema)
  ema_w, swapped = ema_jax.swap(params, state)
  np.testing.assert_array_equal(np.asarray(ema_w["a"]), before["a"])
  back, state_back = ema_jax.swap(ema_w, swapped)
  assert_bitwise(back, params)
  assert_bitwise(ema_jax.ema_params(state_back), before)


# ----------------------------------------------- 4. non-array leaves refused


def _an_activation(x: jax.Array) -> jax.Array:
  return x


class _Opaque:
  pass


@pytest.mark.parametrize("leaf", [_an_activation, _Opaque()],
                         ids=["function", "object"])
@pytest.mark.parametrize("make", [lambda: ema_jax.ema(0.9),
                                  lambda: ema_jax.multi_ema([0.9, 0.99])],
                         ids=["ema", "multi_ema"])
def test_non_array_leaf_is_refused_at_init_naming_path_and_eqx_filter(
    leaf, make):
  params = {"act": leaf, "w": jnp.ones(2, F32)}
  with pytest.raises(TypeError) as info:
    make().init(params)
  message = str(info.value)
  assert "['act']" in message, message
  assert "eqx.filter" in message, message


# ---------------------------------------------- 5. argument types when built


def _float8():
  if not hasattr(jnp, "float8_e4m3fn"):
    pytest.skip("no float8_e4m3fn in this jax")
  return jnp.float8_e4m3fn


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: ema_jax.ema("0.9"), TypeError),
        (lambda: ema_jax.ema(0.9, debias="no"), TypeError),
        (lambda: ema_jax.ema(0.9, start_step=2**31), ValueError),
        (lambda: ema_jax.ema(0.9, update_every=2**31), ValueError),
        (lambda: ema_jax.ema(0.9, ema_dtype=_float8()), ValueError),
        (lambda: ema_jax.ema(0.9, ema_dtype=jnp.int32), ValueError),
    ],
    ids=["str_decay", "str_debias", "start_step_2p31", "update_every_2p31",
         "float8_ema_dtype", "int_ema_dtype"],
)
def test_bad_argument_fails_when_built(build, error):
  with pytest.raises(error):
    build()


def test_multi_ema_string_decay_is_type_error_naming_its_position():
  with pytest.raises(TypeError, match=r"decays\[1\]"):
    ema_jax.multi_ema([0.9, "0.99"])


# ----------------------------------------- 6. swap back never loses the average


def _trained(kind: str) -> tuple[Any, Any, dict[str, Any]]:
  """Params and state after a few updates; the swap keyword arguments to use."""
  if kind == "ema":
    tx, swap_kwargs = ema_jax.ema(0.9), {}
  else:
    tx, swap_kwargs = ema_jax.multi_ema([0.9, 0.5]), {"index": 1}
  params, state = _train(tx, _params(), steps=3, jit=False)
  return params, state, swap_kwargs


def _read(state: Any, kind: str) -> Any:
  return ema_jax.ema_params(state, **({} if kind == "ema" else {"index": 1}))


@pytest.mark.parametrize("kind", ["ema", "multi_ema"])
def test_swap_round_trip_is_bit_exact(kind):
  params, state, kw = _trained(kind)
  raw, before = _snapshot(params), _snapshot(_read(state, kind))
  ema_w, swapped = ema_jax.swap(params, state, **kw)
  assert_bitwise(ema_w, before)
  back, state_back = ema_jax.swap(ema_w, swapped)
  assert_bitwise(back, raw)
  assert_bitwise(_read(state_back, kind), before)


def _swap_in_out(kind: str, how: str, params: Any, state: Any) -> tuple[Any, Any]:
  """Swap in, then swap back with what `how` says; returns swap back's result."""
  kw = {} if kind == "ema" else {"index": 1}
  if how in ("copy_of_raw", "raw_object"):
    ema_w, swapped = ema_jax.swap(params, state, **kw)
    given = jax.tree.map(jnp.copy, params) if how == "copy_of_raw" else params
    return ema_jax.swap(given, swapped)
  if how == "jit_swap":
    swap_in = jax.jit(functools.partial(ema_jax.swap, **kw))
    ema_w, swapped = swap_in(params, state)
    return jax.jit(ema_jax.swap)(ema_w, swapped)
  if how == "jit_lambda":
    ema_w, swapped = jax.jit(lambda p, s: ema_jax.swap(p, s, **kw))(params, state)
    return jax.jit(lambda p, s: ema_jax.swap(p, s))(ema_w, swapped)
  if how == "jit_copy_of_raw":  # under jit no object identity can help
    ema_w, swapped = jax.jit(lambda p, s: ema_jax.swap(p, s, **kw))(params, state)
    given = jax.tree.map(jnp.copy, params)
    return jax.jit(lambda p, s: ema_jax.swap(p, s))(given, swapped)
  raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["copy_of_raw", "raw_object", "jit_swap", "jit_lambda",
            "jit_copy_of_raw"])
@pytest.mark.parametrize("kind", ["ema", "multi_ema"])
def test_swap_back_never_loses_the_average(kind, how):
  params, state, _ = _trained(kind)
  raw, before = _snapshot(params), _snapshot(_read(state, kind))
  try:
    back, state_back = _swap_in_out(kind, how, params, state)
  except ValueError:
    return  # refusing the swap back is allowed
  assert_bitwise(_read(state_back, kind), before)
  assert_bitwise(back, raw)


@pytest.mark.parametrize("kind", ["ema", "multi_ema"])
def test_swap_back_with_wrong_shape_names_the_leaf(kind):
  params, state, kw = _trained(kind)
  ema_w, swapped = ema_jax.swap(params, state, **kw)
  wrong = {**ema_w, "w": jnp.zeros((4, 4), F32)}
  with pytest.raises(ValueError, match=re.escape("['w']")):
    ema_jax.swap(wrong, swapped)


# ------------------------------------------------------------------- 7. index


def _multi_trained() -> tuple[Any, Any]:
  params, state = _train(ema_jax.multi_ema([0.9, 0.5]), _params(), steps=1,
                         jit=False)
  return params, state


def test_index_out_of_range_raises_eagerly_and_under_jit():
  params, state = _multi_trained()
  with pytest.raises((ValueError, TypeError)):
    ema_jax.ema_params(state, index=5)
  with pytest.raises((ValueError, TypeError)):
    jax.jit(lambda s: ema_jax.ema_params(s, index=5))(state)
  with pytest.raises((ValueError, TypeError)):
    ema_jax.swap(params, state, index=7)
  with pytest.raises((ValueError, TypeError)):
    jax.jit(lambda p, s: ema_jax.swap(p, s, index=7))(params, state)


def test_traced_index_is_type_error():
  params, state = _multi_trained()
  with pytest.raises(TypeError):
    jax.jit(lambda s, i: ema_jax.ema_params(s, index=i))(state, 1)
  with pytest.raises(TypeError):
    jax.jit(lambda p, s, i: ema_jax.swap(p, s, index=i))(params, state, 1)


def test_index_and_which_are_keyword_only():
  params, state = _multi_trained()
  with pytest.raises(TypeError):
    ema_jax.ema_params(state, 0)
  with pytest.raises(TypeError):
    ema_jax.swap(params, state, 0)
  with pytest.raises(TypeError):
    ema_jax.swap(params, state, None, 0)


# ---------------------------------------------------------- 8. is_swapped


@pytest.mark.parametrize("kind", ["ema", "multi_ema"])
def test_is_swapped_lives_in_the_core(kind):
  is_swapped = ema_jax.is_swapped
  assert not is_swapped.__module__.startswith("ema_jax.flax")
  params, state, kw = _trained(kind)
  fresh = optax.chain(
      optax.sgd(0.1),
      ema_jax.ema(0.9) if kind == "ema" else ema_jax.multi_ema([0.9, 0.5]),
  ).init(params)
  assert is_swapped(fresh) is False
  assert is_swapped(state) is False
  ema_w, swapped = ema_jax.swap(params, state, **kw)
  assert is_swapped(swapped) is True
  _, back = ema_jax.swap(ema_w, swapped)
  assert is_swapped(back) is False


# ------------------------------------------- 9. one exception type per mistake


@pytest.mark.parametrize("kind", ["ema", "multi_ema"])
def test_swapped_state_refused_with_value_error(kind):
  inner = ema_jax.ema(0.9) if kind == "ema" else ema_jax.multi_ema([0.9, 0.5])
  opt = optax.chain(optax.sgd(0.1), inner)
  params = _params()
  state = opt.init(params)
  kw = {} if kind == "ema" else {"index": 1}
  ema_w, swapped = ema_jax.swap(params, state, **kw)
  grads = _grads(params, 0)
  with pytest.raises(ValueError):
    opt.update(grads, swapped, ema_w)
  with pytest.raises(ValueError):
    jax.jit(opt.update)(grads, swapped, ema_w)
  with pytest.raises(ValueError):
    ema_jax.ema_params(swapped, **kw)


def _ema_states() -> dict[str, Any]:
  params = _params()
  single = ema_jax.ema(0.9).init(params)
  multi = ema_jax.multi_ema([0.9, 0.5]).init(params)
  return {
      "EmaState": single,
      "SwappedEmaState": ema_jax.swap(params, single)[1],
      "MultiEmaState": multi,
      "SwappedMultiEmaState": ema_jax.swap(params, multi, index=0)[1],
  }


@pytest.mark.parametrize(
    "name",
    ["EmaState", "SwappedEmaState", "MultiEmaState", "SwappedMultiEmaState"])
def test_apply_updates_and_average_refuses_ema_states(name):
  params = _params()
  state = _ema_states()[name]
  with pytest.raises(TypeError, match=re.escape("tx.update")):
    ema_jax.apply_updates_and_average(params, _grads(params, 0), state, 0.9)


def _check_fused_matches_chain(dtype: Any, jit: bool) -> None:
  opt = optax.sgd(0.1, momentum=0.9)
  tx = optax.chain(opt, ema_jax.ema(0.9))
  p_chain = _params(dtype)
  p_fused = jax.tree.map(jnp.copy, p_chain)
  s_chain = tx.init(p_chain)
  s_opt = opt.init(p_fused)
  average = jax.tree.map(jnp.copy, ema_jax.ema_params(s_chain))

  def chain_step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def fused_step(p: Any, s: Any, e: Any, g: Any) -> tuple[Any, Any, Any]:
    u, s = opt.update(g, s, p)
    p, e = ema_jax.apply_updates_and_average(p, u, e, 0.9)
    return p, s, e

  if jit:
    chain_step, fused_step = jax.jit(chain_step), jax.jit(fused_step)
  for t in range(4):
    g = _grads(p_chain, t)
    p_chain, s_chain = chain_step(p_chain, s_chain, g)
    p_fused, s_opt, average = fused_step(p_fused, s_opt, average, g)
    assert_bitwise(p_fused, p_chain)
    assert_bitwise(average, ema_jax.ema_params(s_chain))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_apply_updates_and_average_equals_chain_bitwise(dtype, jit):
  _check_fused_matches_chain(dtype, jit)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_apply_updates_and_average_equals_chain_bitwise_float64(jit):
  with jax.enable_x64(True):
    _check_fused_matches_chain(jnp.float64, jit)


# --------------------------------------------- 10. multi_ema takes every option


def _multi_cases() -> dict[str, tuple[list[Any], dict[str, Any]]]:
  return {
      "debias": ([0.9, 0.99], {"debias": True}),
      "start_update_every": (
          [0.9, ema_jax.power_decay(gamma=7.0)],
          {"start_step": 3, "update_every": 2},
      ),
      "bf16_nearest": ([0.5, 0.9], {"ema_dtype": BF16, "rounding": "nearest"}),
      "mask": ([0.9, 0.99], {"mask": {"w": True, "b": False}}),
      "mixed_decays": (
          [0.9, ema_jax.warmup_decay(0.999), ema_jax.power_decay(gamma=7.0)],
          {},
      ),
      "pinned_host": ([0.9, 0.99], {"memory_kind": "pinned_host"}),
  }


@pytest.mark.parametrize("case", list(_multi_cases()))
def test_multi_ema_average_equals_single_ema_with_same_options(case):
  decays, options = _multi_cases()[case]
  if options.get("memory_kind") == "pinned_host" and not _pinned_host_available():
    pytest.skip("the default device offers no 'pinned_host' memory")
  params = jax.device_put(_params())
  _, multi_state = _train(ema_jax.multi_ema(decays, **options), params, 20)
  for i, decay in enumerate(decays):
    _, single_state = _train(ema_jax.ema(decay, **options), params, 20)
    got = _snapshot(ema_jax.ema_params(multi_state, index=i))
    want = _snapshot(ema_jax.ema_params(single_state))
    fg, dg = _flat_none(got)
    fw, dw = _flat_none(want)
    assert dg == dw
    for a, b in zip(fg, fw):
      if a is None or b is None:
        assert a is None and b is None
        continue
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)


def test_multi_ema_stochastic_rounding_is_independent_and_unbiased():
  n, decay, steps = 4096, 0.99, 12
  tx = ema_jax.multi_ema([decay, decay], ema_dtype=BF16,
                         rounding="stochastic", key=0)
  rng = np.random.default_rng(0)
  # Start exactly representable in bfloat16, then jump by less than the
  # bfloat16 spacing and stay: round-to-nearest would never move the average
  # ((1 - decay) * jump is under half a bfloat16 ulp in [1, 2)).
  start = np.asarray(
      jnp.asarray(rng.uniform(1.0, 1.9, n).astype(np.float32)).astype(BF16)
  ).astype(np.float32)
  jump = rng.uniform(0.1, 0.3, n).astype(np.float32)
  params = {"w": jnp.asarray(start)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  exact = start.astype(np.float64)
  zero = jnp.zeros(n, F32)
  for t in range(steps):
    u = jnp.asarray(jump) if t == 0 else zero
    _, state = update({"w": u}, state, params)
    params = {"w": params["w"] + u}
    exact = decay * exact + (1.0 - decay) * np.asarray(params["w"], np.float64)
  stored = [
      np.asarray(ema_jax.ema_params(state, index=i)["w"]).astype(np.float64)
      for i in range(2)
  ]
  assert ema_jax.ema_params(state, index=0)["w"].dtype == BF16
  assert not np.array_equal(stored[0], stored[1])  # independent noise
  errors = [s - exact for s in stored]
  for err in errors:
    bound = 4.0 * err.std() / math.sqrt(n)
    assert abs(err.mean()) < bound, (err.mean(), bound)
  corr = np.corrcoef(errors[0], errors[1])[0, 1]
  assert abs(corr) < 0.2, corr


# -------------------------------------------------------------- 11. presets


@pytest.mark.parametrize(
    "build",
    [
        lambda: ema_jax.presets.keras(0.99, 5),
        lambda: ema_jax.presets.tfa(0.99, 0, True),
        lambda: ema_jax.presets.timm(0.999, 0.0, True),
        lambda: ema_jax.presets.diffusers(0.999, 0.0),
        lambda: ema_jax.presets.ema_pytorch(0.999, 100),
    ],
    ids=["keras", "tfa", "timm", "diffusers", "ema_pytorch"],
)
def test_preset_options_after_the_decay_are_keyword_only(build):
  with pytest.raises(TypeError):
    build()


_PRESETS = {
    "keras": lambda **kw: ema_jax.presets.keras(0.9, **kw),
    "tfa": lambda **kw: ema_jax.presets.tfa(0.9, **kw),
    "timm": lambda **kw: ema_jax.presets.timm(0.9, **kw),
    "diffusers": lambda **kw: ema_jax.presets.diffusers(0.9, **kw),
    "ema_pytorch": lambda **kw: ema_jax.presets.ema_pytorch(
        0.9, update_after_step=0, update_every=1, **kw),
}


@pytest.mark.parametrize("name", list(_PRESETS))
def test_preset_accepts_bf16_stochastic_mask_and_memory_kind(name):
  memory_kind = "pinned_host" if _pinned_host_available() else "device"
  tx = _PRESETS[name](
      ema_dtype=BF16, rounding="stochastic", key=0,
      mask={"w": True, "b": False}, memory_kind=memory_kind,
  )
  params = jax.device_put(_params())
  init_ema = _snapshot(ema_jax.ema_params(optax.chain(optax.sgd(0.1), tx).init(
      params)))
  _, state = _train(tx, params, steps=3)
  ema = ema_jax.ema_params(state)
  assert ema["b"] is None
  assert ema["w"].dtype == BF16
  assert init_ema["w"].dtype == BF16
  assert not np.array_equal(np.asarray(ema["w"]), init_ema["w"])
  if memory_kind == "pinned_host":
    assert ema["w"].sharding.memory_kind == "pinned_host"


# ------------------------------- 12. EMAs in optax.multi_transform / masked


def _partial_tx(wrapper: str) -> optax.GradientTransformation:
  inner = optax.chain(optax.sgd(0.1), ema_jax.ema(0.5))
  if wrapper == "multi_transform":
    return optax.multi_transform(
        {"a": inner, "b": optax.sgd(0.1)}, {"x": "a", "y": "b"}
    )
  return optax.masked(inner, {"x": True, "y": False})


def _partial_params() -> dict[str, jax.Array]:
  return {"x": _rand((3,), 7), "y": _rand((2,), 8)}


@pytest.mark.parametrize("wrapper", ["multi_transform", "masked"])
def test_partial_ema_reads_none_and_swaps_only_covered_leaves(wrapper):
  tx = _partial_tx(wrapper)
  params = _partial_params()
  x0 = np.asarray(params["x"])
  state = tx.init(params)
  history = []
  for t in range(3):
    updates, state = tx.update(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
    history.append(np.asarray(params["x"]))
  ema = ema_jax.ema_params(state)
  assert isinstance(ema, dict) and set(ema) == {"x", "y"}
  assert ema["y"] is None
  assert _masked_node_free(ema)
  np.testing.assert_allclose(
      np.asarray(ema["x"]).astype(np.float64), _ema64(x0, history, 0.5),
      rtol=2e-6,
  )
  raw, before = _snapshot(params), _snapshot(ema)
  ema_w, swapped = ema_jax.swap(params, state)
  assert _masked_node_free(ema_w)
  assert_bitwise(ema_w["x"], before["x"])
  assert_bitwise(ema_w["y"], raw["y"])
  back, state_back = ema_jax.swap(ema_w, swapped)
  assert_bitwise(back, raw)
  assert_bitwise(ema_jax.ema_params(state_back), before)


@pytest.mark.parametrize("wrapper", ["multi_transform", "masked"])
def test_partial_ema_flax_hook_round_trip_and_export(wrapper):
  pytest.importorskip("flax")
  import ema_jax.flax
  from flax.training import train_state

  ts = train_state.TrainState.create(
      apply_fn=None, params=_partial_params(), tx=_partial_tx(wrapper)
  )
  for t in range(3):
    ts = ts.apply_gradients(grads=_grads(ts.params, t))
  raw = _snapshot(ts.params)
  ema = _snapshot(ema_jax.ema_params(ts.opt_state))
  hook = ema_jax.flax.SwapEMAWeights()
  ts_ema = hook.on_test_begin(ts)
  assert_bitwise(ts_ema.params["x"], ema["x"])
  assert_bitwise(ts_ema.params["y"], raw["y"])
  ts_back = hook.on_test_end(ts_ema)
  assert_bitwise(ts_back.params, raw)
  assert_bitwise(ema_jax.ema_params(ts_back.opt_state), ema)
  # export_ema's docstring: "Linen: a variables dict, {'params': ...} ... for
  # model.apply", with non-averaged state at "its current value, as in Keras".
  # Choice: an uncovered leaf exports the params' value (a complete tree that
  # model.apply can use, the same as what `swap` puts in the params), never
  # None or an optax.MaskedNode.
  exported = ema_jax.flax.export_ema(ts)
  assert set(exported) == {"params"}
  assert _masked_node_free(exported)
  assert_bitwise(exported["params"]["x"], ema["x"])
  assert_bitwise(exported["params"]["y"], raw["y"])


@pytest.mark.parametrize("decay", [0.9, ema_jax.constant_decay(0.9)], ids=["float", "schedule"])
def test_built_inside_a_trace(decay):
  # Templates for checkpoints are built under `jax.eval_shape`, and steps may
  # build their transformation inside `jit`: building must not need concrete
  # values, and what it builds must average as when built outside.
  params = {"w": jnp.arange(3.0)}

  def run(p):
    tx = ema_jax.ema(decay)
    return tx.update(p, tx.init(p), {"w": p["w"] + 1.0})[1].ema

  jax.eval_shape(run, params)
  assert_bitwise_equal(jax.jit(run)(params), run(params))
