"""`ema_jax.swap` and `ema_jax.ema_params`: exact, pure, found anywhere in an optax state."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_jax
from _util import Pair, assert_bitwise_equal, is_key


def make_params(dtype=jnp.float32) -> Any:
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  w[0, 0] = -0.0  # bit-exactness must keep the sign of zero
  return {
      "dense": [{"w": jnp.asarray(w, dtype), "b": jnp.asarray(rng.normal(size=4),
                                                              dtype)}],
      "pair": Pair(a=jnp.asarray(rng.normal(size=2), dtype), b=None),
      "steps": jnp.arange(3, dtype=jnp.int32),
      "key": jax.random.key(3),
  }


def grads_like(params: Any, seed: int) -> Any:
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: None if is_key(p) else jnp.asarray(
          rng.normal(size=p.shape), p.dtype) if jnp.issubdtype(
              p.dtype, jnp.floating) else jnp.ones_like(p),
      params,
  )


def apply(params: Any, updates: Any) -> Any:
  return jax.tree.map(
      lambda p, u: p if u is None else (p + u).astype(p.dtype),
      params, updates, is_leaf=lambda x: x is None,
  )


def train(tx, params, state, steps, seed=0):
  for t in range(steps):
    updates, state = tx.update(grads_like(params, seed + t), state, params)
    params = apply(params, updates)
  return params, state


@pytest.mark.parametrize(
    "dtype, kwargs",
    [
        (jnp.float32, {}),
        (jnp.bfloat16, {}),  # float32 EMA of bf16 params
        (jnp.float16, {"ema_dtype": jnp.float32}),
        (jnp.float32, {"mask": {"dense": True, "pair": False, "steps": True,
                                "key": True}}),
        (jnp.float32, {"debias": True}),
    ],
)
@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_swap_twice_is_identity_bit_for_bit(dtype, kwargs):
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9, **kwargs))
  params = make_params(dtype)
  params, state = train(tx, params, tx.init(params), steps=3)
  swapped_params, swapped_state = ema_jax.swap(params, state)
  back_params, back_state = ema_jax.swap(swapped_params, swapped_state)
  assert_bitwise_equal(back_params, params)
  assert_bitwise_equal(back_state, state)
  assert isinstance(swapped_state[1], ema_jax.SwappedEmaState)
  assert isinstance(back_state[1], ema_jax.EmaState)
  # The swapped params are the EMA (in its dtype), the state holds the params.
  ema = ema_jax.ema_params(state)
  for p, e, s, held in zip(
      jax.tree.leaves(params, is_leaf=lambda x: x is None),
      jax.tree.leaves(ema, is_leaf=lambda x: x is None),
      jax.tree.leaves(swapped_params, is_leaf=lambda x: x is None),
      jax.tree.leaves(swapped_state[1].raw_params, is_leaf=lambda x: x is None),
  ):
    if e is None:  # masked: stays in the params, nothing held
      assert s is p and held is None
    else:
      assert_bitwise_equal(s, e)
      assert_bitwise_equal(held, p)
  if dtype == jnp.bfloat16:
    assert swapped_params["dense"][0]["w"].dtype == jnp.float32
    assert back_params["dense"][0]["w"].dtype == jnp.bfloat16


def test_swap_on_bare_ema_state():
  tx = ema_jax.ema(0.5)
  params = make_params()
  params, state = train(tx, params, tx.init(params), steps=2)
  out_params, swapped = ema_jax.swap(params, state)
  assert isinstance(swapped, ema_jax.SwappedEmaState)
  assert_bitwise_equal(out_params, state.ema)
  # The count is held with another shape while swapped (a cached graph
  # sees the swap through it), same value.
  assert swapped.count.shape == (1,) and int(swapped.count[0]) == int(state.count)
  back_params, back = ema_jax.swap(out_params, swapped)
  assert_bitwise_equal(back_params, params)
  assert_bitwise_equal(back, state)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda ema: optax.chain(optax.adam(1e-2), ema),
        lambda ema: optax.MultiSteps(optax.chain(optax.sgd(0.1), ema), 2),
        lambda ema: optax.chain(
            optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), ema),
        lambda ema: optax.chain(optax.sgd(0.1),
                                optax.inject_hyperparams(ema_jax.ema)(0.9)),
        lambda ema: optax.chain(optax.clip(1.0), optax.chain(optax.sgd(0.1),
                                                             ema)),
    ],
    ids=["chain", "multisteps", "inject_hyperparams", "inject_ema", "nested"],
)
@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_swap_on_nested_optax_states(wrap):
  tx = wrap(ema_jax.ema(0.9))
  params = {"w": jnp.asarray(np.arange(6.0).reshape(2, 3), jnp.float32)}
  params, state = train(tx, params, tx.init(params), steps=4)
  ema = ema_jax.ema_params(state)
  assert not np.allclose(ema["w"], params["w"])
  swapped_params, swapped_state = ema_jax.swap(params, state)
  assert_bitwise_equal(swapped_params, ema)
  # Exactly one EMA state, now swapped, in the same place.
  kinds = [type(x) for x in jax.tree.leaves(
      swapped_state, is_leaf=lambda x: isinstance(
          x, (ema_jax.EmaState, ema_jax.SwappedEmaState)))
           if isinstance(x, (ema_jax.EmaState, ema_jax.SwappedEmaState))]
  assert kinds == [ema_jax.SwappedEmaState]
  back_params, back_state = ema_jax.swap(swapped_params, swapped_state)
  assert_bitwise_equal(back_params, params)
  assert_bitwise_equal(back_state, state)
  # The swapped state still trains once swapped back.
  train(tx, back_params, back_state, steps=1)


def _two_emas():
  tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.5), ema_jax.ema(0.9))
  params = jnp.zeros(2)
  params, state = train(tx, params, tx.init(params), steps=1)
  return params, state  # params = -g; EMAs 0.5 * p and 0.1 * p


def test_several_ema_states_error_names_their_paths():
  params, state = _two_emas()
  with pytest.raises(ValueError, match=r"2 EMA states \(at \[1\], \[2\]\).*which"):
    ema_jax.ema_params(state)
  with pytest.raises(ValueError, match=r"\[1\], \[2\]"):
    ema_jax.swap(params, state)


def test_which_picks_one():
  params, state = _two_emas()
  np.testing.assert_allclose(ema_jax.ema_params(state, which=0), 0.5 * params,
                             rtol=1e-6)
  np.testing.assert_allclose(ema_jax.ema_params(state, which=1), 0.1 * params,
                             rtol=1e-6)
  swapped_params, swapped = ema_jax.swap(params, state, which=1)
  assert_bitwise_equal(swapped_params, state[2].ema)
  assert isinstance(swapped[1], ema_jax.EmaState)
  assert isinstance(swapped[2], ema_jax.SwappedEmaState)
  # The other one is still readable, and swapping back restores everything.
  assert_bitwise_equal(ema_jax.ema_params(swapped, which=0), state[1].ema)
  back_params, back = ema_jax.swap(swapped_params, swapped, which=1)
  assert_bitwise_equal(back_params, params)
  assert_bitwise_equal(back, state)
  with pytest.raises(ValueError, match=r"`which=2` is out of range"):
    ema_jax.ema_params(state, which=2)


def test_no_ema_state_errors():
  tx = optax.adam(1e-3)
  params = jnp.zeros(2)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"No ema_jax EMA state"):
    ema_jax.ema_params(state)
  with pytest.raises(ValueError, match=r"No ema_jax EMA state"):
    ema_jax.swap(params, state)


def test_ema_params_on_swapped_state_errors():
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))
  params = jnp.ones(3)
  _, swapped = ema_jax.swap(params, tx.init(params))
  with pytest.raises(ValueError, match=r"swapped"):
    ema_jax.ema_params(swapped)


def test_swap_with_other_params_shape_names_the_leaf():
  tx = ema_jax.ema(0.9)
  state = tx.init({"a": {"w": jnp.zeros((2, 3))}})
  with pytest.raises(ValueError, match=r"\['a'\]\['w'\].*\(3, 2\)"):
    ema_jax.swap({"a": {"w": jnp.zeros((3, 2))}}, state)
  with pytest.raises(ValueError, match=r"structure"):
    ema_jax.swap({"b": jnp.zeros((2, 3))}, state)


_ARITHMETIC = {
    "add", "subtract", "multiply", "divide", "convert", "fusion", "select",
    "maximum", "minimum", "exponential", "log", "negate", "reduce", "dot",
}
_ALLOWED = {"parameter", "copy", "tuple", "get-tuple-element", "bitcast"}


def _opcodes(hlo_text: str) -> set[str]:
  # HLO instructions read `%name = type opcode(operands), ...`.
  ops = set()
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\(", line)
    if m:
      ops.add(m.group(2))
  return ops


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swap_compiles_to_no_arithmetic(dtype):
  tx = optax.chain(optax.sgd(1e-3), ema_jax.ema(0.99, debias=True))
  params = make_params(dtype)
  params, state = train(tx, params, tx.init(params), steps=1)
  hlo = jax.jit(ema_jax.swap).lower(params, state).compile().as_text()
  ops = _opcodes(hlo)
  assert "parameter" in ops  # the parser read the module
  assert not ops & _ARITHMETIC, ops
  assert ops <= _ALLOWED, ops
  # The check can fail: a real conversion shows up in the same parser.
  converting = jax.jit(lambda p, s: ema_jax.swap(
      jax.tree.map(lambda x: x * 2 if x.dtype == dtype else x, p), s))
  assert _opcodes(converting.lower(params, state).compile().as_text()) & (
      _ARITHMETIC)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_swap_under_jit_matches_eager():
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))
  params = make_params(jnp.bfloat16)
  params, state = train(tx, params, tx.init(params), steps=2)
  eager = ema_jax.swap(params, state)
  jitted = jax.jit(ema_jax.swap)(params, state)
  assert_bitwise_equal(jitted, eager)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("jit", [False, True])
def test_swap_eval_swap_back_keeps_the_trajectory(jit):
  tx = optax.chain(optax.adam(1e-2), ema_jax.ema(0.9, update_every=2))
  params = {"w": jnp.asarray(np.linspace(-1, 1, 6), jnp.float32),
            "n": jnp.zeros((), jnp.int32)}
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return apply(params, updates), state

  def evaluate(params):
    return jnp.sum(params["w"] ** 2)

  swap = ema_jax.swap
  if jit:
    step, evaluate, swap = jax.jit(step), jax.jit(evaluate), jax.jit(swap)

  plain_params, plain_state = params, state
  for t in range(7):
    grads = grads_like(params, 100 + t)
    plain_params, plain_state = step(plain_params, plain_state, grads)
    params, state = step(params, state, grads)
    if t % 2 == 0:  # evaluate with the EMA, then swap back
      ema_weights, swapped = swap(params, state)
      loss = evaluate(ema_weights)
      np.testing.assert_allclose(
          loss, jnp.sum(ema_jax.ema_params(state)["w"] ** 2), rtol=1e-6)
      params, state = swap(ema_weights, swapped)
    assert_bitwise_equal(params, plain_params)
    assert_bitwise_equal(state, plain_state)


def test_swapping_back_with_the_raw_params_keeps_the_average():
  tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.5))
  params = {"w": jnp.array([2.0]), "n": jnp.int32(3)}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([2.0]), "n": None}, state, params)
  params = {"w": params["w"] + updates["w"], "n": params["n"]}
  ema_weights, swapped = ema_jax.swap(params, state)
  # The typo: raw params instead of ema_weights. The state kept the average.
  for given in (params, ema_weights):
    back, state_back = ema_jax.swap(given, swapped)
    assert_bitwise_equal(back, params)
    assert_bitwise_equal(state_back, state)
    np.testing.assert_array_equal(ema_jax.ema_params(state_back)["w"], [1.0])


def test_multi_ema_swap_back_writes_nothing():
  tx = ema_jax.multi_ema([0.5, 0.9])
  params = {"w": jnp.arange(4.0)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(4)}, state, params)
  ema_weights, swapped = ema_jax.swap(params, state, index=1)
  _, restored = ema_jax.swap(params, swapped)  # the raw params: no harm done
  assert restored.ema["w"] is state.ema["w"]
  back, restored = ema_jax.swap(ema_weights, swapped)
  assert back["w"] is params["w"]
  assert restored.ema["w"] is state.ema["w"]  # the stack itself, not a rewrite
  compiled = jax.jit(ema_jax.swap).lower(ema_weights, swapped).compile().as_text()
  assert "dynamic-update-slice" not in compiled and "select" not in compiled
