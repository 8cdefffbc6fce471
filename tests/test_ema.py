"""`ema_jax.ema` against an independent float64 NumPy implementation of the formulas."""

from __future__ import annotations

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_jax
from ema_jax import _compat
from _util import Pair, is_float, is_key, leaves

# ---------------------------------------------------------------------------
# Helpers: trees, trajectories and the float64 reference.
# ---------------------------------------------------------------------------


def nested_tree(dtype: Any = jnp.float32) -> Any:
  """Nested dicts, a list, a tuple, a NamedTuple, None, int/bool/key leaves."""
  return {
      "enc": [
          {"w": jnp.zeros((3, 2), dtype), "b": jnp.zeros((2,), dtype)},
          Pair(a=jnp.zeros((4,), dtype), b=None),
      ],
      "head": (jnp.zeros((), dtype), jnp.zeros((2, 2), dtype)),
      "step": jnp.zeros((2,), jnp.int32),
      "flag": jnp.zeros((3,), bool),
      "key": jax.random.key(0),
  }


def _flax() -> Any:
  # Flax's floor needs a newer jax than the core's: the core's floor venv has
  # no Flax, and these trees run in the Flax venv (.ci/lower_bounds.sh).
  pytest.importorskip("flax", reason="Flax trees need flax installed")
  import flax.nnx  # noqa: F401  (flax.nnx is not imported by `import flax`)

  return flax


def frozendict_tree() -> Any:
  return _flax().core.FrozenDict({
      "params": {"dense": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}},
      "batch_stats": {"mean": jnp.zeros(3), "n": jnp.zeros((), jnp.int32)},
  })


def nnx_state_tree() -> Any:
  nnx = _flax().nnx

  class Model(nnx.Module):

    def __init__(self):
      self.lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      self.rngs = nnx.Rngs(1)  # a key and a uint32 count: carried, not averaged

  return nnx.split(Model())[1]


TREES: dict[str, Callable[[], Any]] = {
    "nested": nested_tree,
    "frozendict": frozendict_tree,
    "nnx_state": nnx_state_tree,
}


def random_like(tree: Any, rng: np.random.Generator, t: int) -> Any:
  """A random value for every leaf of `tree` (keys too), distinct per step `t`."""

  def one(x):
    if is_key(x):
      return jax.random.fold_in(x, 1000 + t)
    if is_float(x):
      return jnp.asarray(rng.normal(size=x.shape), x.dtype)
    if x.dtype == bool:
      return jnp.asarray(rng.random(x.shape) < 0.5)
    return jnp.asarray(rng.integers(0, 100, size=x.shape), x.dtype)

  return jax.tree.map(one, tree)


def trajectory(tree: Any, steps: int, seed: int = 0) -> tuple[Any, list[Any]]:
  rng = np.random.default_rng(seed)
  p0 = random_like(tree, rng, 0)
  return p0, [random_like(tree, rng, t + 1) for t in range(steps)]


def zero_updates(params: Any) -> Any:
  # With zero updates, `params + updates` is exactly `params`, so the EMA must
  # follow the params passed in; keys get None (optax's "no update").
  return jax.tree.map(lambda x: None if is_key(x) else jnp.zeros_like(x), params)


def run(tx, p0, traj, *, jit: bool = True):
  """Drive `tx` through `traj` (params after each update); EMA after each step."""

  def step(state, p):
    _, state = tx.update(zero_updates(p), state, p)
    return state, ema_jax.ema_params(state)

  state = tx.init(p0)
  step = jax.jit(step) if jit else step
  history = []
  for p in traj:
    state, e = step(state, p)
    history.append(e)
  return state, history


def np_leaf(x: Any) -> np.ndarray:
  if is_key(x):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


def reference(
    p0: Any,
    traj: list[Any],
    decay_at: Callable[[int], float],
    *,
    start_step: int = 0,
    update_every: int = 1,
    debias: bool = False,
    mask: list[bool] | None = None,
) -> list[list[Any]]:
  """The EMA formulas in float64, one list of leaves per step.

  `decay_at(j)` is the schedule at `j` = updates since averaging began. With
  `update_every=k` the EMA moves only when `(j + 1) % k == 0`, with the
  product of the schedule over the k steps `j-k+1..j`. With `debias`, the
  Adam form: `b <- d b + (1 - d) p` from `b = 0`, output `b / (1 - prod d)`.
  """
  flat0 = leaves(p0)
  mask = mask if mask is not None else [True] * len(flat0)
  averaged = [is_float(x) and m for x, m in zip(flat0, mask)]
  e = [np.asarray(x, np.float64) if a else None for x, a in zip(flat0, averaged)]
  b = [np.zeros_like(x) if x is not None else None for x in e]
  decay_product = 1.0
  out = []
  for count, p in enumerate(traj):
    flat = leaves(p)
    j = count - start_step
    if j < 0:
      active, d = True, 0.0
    else:
      active = (j + 1) % update_every == 0
      if active:
        d = math.prod(decay_at(s) for s in range(j - update_every + 1, j + 1))
    if active:
      decay_product *= d
      for i, (x, a) in enumerate(zip(flat, averaged)):
        if not a:
          continue
        x = np.asarray(x, np.float64)
        if debias:
          b[i] = d * b[i] + (1 - d) * x
          e[i] = b[i] / (1 - decay_product)
        else:
          e[i] = d * e[i] + (1 - d) * x
    step_out = []
    for x, a, m, ei in zip(flat, averaged, mask, e):
      if x is None:
        step_out.append(None)
      elif a:
        step_out.append(ei.copy())
      elif is_float(x) and not m:
        step_out.append(None)
      else:
        step_out.append(np_leaf(x))  # carried: the latest value
    out.append(step_out)
  return out


def assert_matches(history, expected, *, rtol=2e-5, atol=2e-5):
  assert len(history) == len(expected)
  for t, (got, want) in enumerate(zip(history, expected)):
    got = leaves(got)
    assert len(got) == len(want), f"step {t}: {len(got)} vs {len(want)} leaves"
    for i, (g, w) in enumerate(zip(got, want)):
      if w is None:
        assert g is None, f"step {t} leaf {i}: expected None, got {g!r}"
        continue
      g = np_leaf(g)
      if np.issubdtype(w.dtype, np.floating) and w.dtype == np.float64:
        np.testing.assert_allclose(
            g.astype(np.float64), w, rtol=rtol, atol=atol,
            err_msg=f"step {t} leaf {i}",
        )
      else:
        np.testing.assert_array_equal(g, w, err_msg=f"step {t} leaf {i}")


# Public schedules and the same formulas written out for NumPy.
SCHEDULES: dict[str, tuple[Any, Callable[[int], float]]] = {
    "float": (0.8, lambda j: 0.8),
    "constant": (ema_jax.constant_decay(0.9), lambda j: 0.9),
    "tf_dynamic": (
        ema_jax.tf_dynamic_decay(0.95),
        lambda j: min(0.95, (1 + j) / (10 + j)),
    ),
    "warmup": (
        ema_jax.warmup_decay(0.97, inv_gamma=2.0, power=0.75, min_decay=0.2),
        lambda j: max(min(1 - (1 + j / 2.0) ** -0.75, 0.97), 0.2),
    ),
    "power": (ema_jax.power_decay(gamma=3.0), lambda j: (1 - 1 / (j + 1)) ** 4),
    "half_life": (ema_jax.half_life_decay(4.0), lambda j: 0.5 ** (1 / 4)),
}


# ---------------------------------------------------------------------------
# The formulas.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_constant_decay_on_pytrees(tree_name):
  p0, traj = trajectory(TREES[tree_name](), steps=12, seed=1)
  _, history = run(ema_jax.ema(0.9), p0, traj)
  assert_matches(history, reference(p0, traj, lambda j: 0.9))
  # The container types survive: same tree structure as the params.
  assert jax.tree.structure(history[-1]) == jax.tree.structure(p0)


@pytest.mark.parametrize(
    "schedule_name, start_step, update_every, debias",
    [
        ("float", 0, 1, False),
        ("float", 3, 1, False),
        ("constant", 0, 4, False),
        ("constant", 2, 3, True),
        ("constant", 0, 1, True),
        ("tf_dynamic", 0, 1, False),
        ("tf_dynamic", 5, 2, False),
        ("warmup", 0, 1, False),
        ("warmup", 1, 3, True),
        ("power", 0, 1, False),
        ("power", 0, 5, False),
        ("power", 4, 2, True),
        ("half_life", 0, 1, True),
        ("half_life", 2, 4, False),
    ],
)
def test_schedules_start_step_update_every_debias(
    schedule_name, start_step, update_every, debias
):
  decay, decay_at = SCHEDULES[schedule_name]
  tx = ema_jax.ema(
      decay, start_step=start_step, update_every=update_every, debias=debias
  )
  p0, traj = trajectory(nested_tree(), steps=23, seed=2)
  _, history = run(tx, p0, traj)
  expected = reference(
      p0, traj, decay_at, start_step=start_step, update_every=update_every,
      debias=debias,
  )
  assert_matches(history, expected)


def test_update_every_compensates_with_the_product_of_the_schedule():
  # A step change: before it the EMA is at 0, after it the params are 1. With
  # a constant decay d and update_every=k the EMA at step n*k is 1 - d**(n*k),
  # exactly what update_every=1 gives: the horizon in steps is unchanged.
  p0 = {"w": jnp.zeros(())}
  traj = [{"w": jnp.ones(())}] * 24
  _, every1 = run(ema_jax.ema(0.9), p0, traj)
  _, every4 = run(ema_jax.ema(0.9, update_every=4), p0, traj)
  for t in range(24):
    n = t + 1
    last_multiple = n - n % 4
    np.testing.assert_allclose(float(every4[t]["w"]), 1 - 0.9**last_multiple,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(every1[t]["w"]), 1 - 0.9**n, rtol=1e-6)


def test_debias_is_unbiased_from_the_first_update():
  # The output does not depend on the initial params at all.
  p0, traj = trajectory({"w": jnp.zeros(5)}, steps=6, seed=3)
  other_p0 = {"w": p0["w"] + 100.0}
  _, h1 = run(ema_jax.ema(0.99, debias=True), p0, traj)
  _, h2 = run(ema_jax.ema(0.99, debias=True), other_p0, traj)
  np.testing.assert_array_equal(h1[0]["w"], traj[0]["w"])  # first update copies
  for a, b in zip(h1, h2):
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
  # A constant sequence is averaged to itself (no pull towards zero).
  const = [{"w": jnp.full(5, 3.0)}] * 10
  _, h = run(ema_jax.ema(0.99, debias=True), p0, const)
  np.testing.assert_allclose(h[-1]["w"], 3.0, rtol=1e-6)


def test_averages_params_after_the_update():
  # In a chain with a real optimizer, the EMA is of `params + updates`, and the
  # updates pass through unchanged.
  tx = optax.chain(optax.sgd(0.5), ema_jax.ema(0.7))
  ref_tx = optax.sgd(0.5)
  rng = np.random.default_rng(4)
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
  state, ref_state = tx.init(params), ref_tx.init(params)
  e = np.asarray(params["w"], np.float64)
  for _ in range(8):
    grads = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = ref_tx.update(grads, ref_state, params)
    np.testing.assert_array_equal(updates["w"], ref_updates["w"])
    params = optax.apply_updates(params, updates)
    e = 0.7 * e + 0.3 * np.asarray(params["w"], np.float64)
    np.testing.assert_allclose(ema_jax.ema_params(state)["w"], e, rtol=1e-6)
  assert int(state[1].count) == 8


def test_init_is_a_copy_of_the_params():
  p0, _ = trajectory(nested_tree(jnp.bfloat16), steps=0)
  state = ema_jax.ema(0.9).init(p0)
  assert int(state.count) == 0 and state.debias_norm is None
  for p, e in zip(leaves(p0), leaves(state.ema)):
    if p is None:
      assert e is None
      continue
    if is_float(p):
      assert e.dtype == jnp.float32
    else:
      assert e.dtype == p.dtype
    np.testing.assert_array_equal(np_leaf(e).astype(np_leaf(p).dtype),
                                  np_leaf(p))


def test_int_bool_key_leaves_are_carried():
  p0, traj = trajectory(nested_tree(), steps=4, seed=5)
  _, history = run(ema_jax.ema(0.999), p0, traj)
  for p, e in zip(traj, history):
    np.testing.assert_array_equal(e["step"], p["step"])
    np.testing.assert_array_equal(e["flag"], p["flag"])
    assert e["key"].dtype == p["key"].dtype
    np.testing.assert_array_equal(jax.random.key_data(e["key"]),
                                  jax.random.key_data(p["key"]))
  # ...while float leaves are averaged, not copied.
  assert not np.allclose(history[-1]["enc"][0]["w"], traj[-1]["enc"][0]["w"])


def test_nnx_state_ema_keeps_rng_state():
  p0, traj = trajectory(nnx_state_tree(), steps=5, seed=6)
  state, history = run(ema_jax.ema(0.9), p0, traj)
  assert isinstance(state.ema, _flax().nnx.State)
  last = history[-1]
  np.testing.assert_array_equal(
      jax.random.key_data(last["rngs"]["default"]["key"].get_value()),
      jax.random.key_data(traj[-1]["rngs"]["default"]["key"].get_value()),
  )
  assert last["rngs"]["default"]["count"].get_value().dtype == jnp.uint32


# ---------------------------------------------------------------------------
# Mask.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_callable", [False, True])
def test_mask(as_callable):
  params = {"enc": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)},
            "head": jnp.zeros(4)}
  if as_callable:
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    flags = [False, True, False]  # leaf order: enc.b, enc.w, head
  else:
    mask = {"enc": True, "head": False}  # a prefix of the params tree
    flags = [True, True, False]
  p0, traj = trajectory(params, steps=6, seed=7)
  state, history = run(ema_jax.ema(0.8, mask=mask), p0, traj)
  assert_matches(history, reference(p0, traj, lambda j: 0.8, mask=flags))
  masked_paths = [
      path for (path, _), f in
      zip(jax.tree_util.tree_flatten_with_path(params)[0], flags) if not f
  ]
  for path in masked_paths:
    node = state.ema
    for k in path:
      node = node[k.key]
    assert node is None
  # swap leaves masked leaves in the params alone and swaps the others.
  final = traj[-1]
  swapped_params, swapped_state = ema_jax.swap(final, state)
  for (path, p), s, e, f in zip(
      jax.tree_util.tree_flatten_with_path(final)[0],
      jax.tree.leaves(swapped_params), leaves(state.ema), flags,
  ):
    if f:
      np.testing.assert_array_equal(s, e)
    else:
      assert s is p, jax.tree_util.keystr(path)


def test_mask_with_wrong_structure_fails():
  with pytest.raises(ValueError, match="`mask`"):
    ema_jax.ema(0.9, mask={"nope": True}).init({"w": jnp.zeros(2)})


# ---------------------------------------------------------------------------
# Dtypes.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_ema_dtype_default(dtype):
  p0, traj = trajectory({"w": jnp.zeros((4,), dtype)}, steps=10, seed=8)
  state, history = run(ema_jax.ema(0.9), p0, traj)
  assert state.ema["w"].dtype == jnp.float32
  # The low-precision params, exactly as given, averaged in float32.
  assert_matches(history, reference(p0, traj, lambda j: 0.9), rtol=1e-6,
                 atol=1e-6)


@pytest.mark.parametrize(
    "param_dtype, ema_dtype",
    [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16),
     (jnp.bfloat16, jnp.float16)],
)
def test_ema_dtype_override(param_dtype, ema_dtype):
  p0, traj = trajectory({"w": jnp.zeros((4,), param_dtype)}, steps=5, seed=9)
  state, history = run(ema_jax.ema(0.5, ema_dtype=ema_dtype), p0, traj)
  assert state.ema["w"].dtype == ema_dtype
  # Each step: f32 arithmetic, rounded to the storage dtype.
  e = np.asarray(p0["w"]).astype(ema_dtype)
  for p, h in zip(traj, history):
    mixed = 0.5 * e.astype(np.float32) + 0.5 * np.asarray(p["w"], np.float32)
    e = mixed.astype(ema_dtype)
    np.testing.assert_allclose(np.asarray(h["w"], np.float32),
                               e.astype(np.float32), rtol=1e-2)


def test_bf16_ema_stops_moving_but_float32_default_tracks():
  # 1 - 0.999 is far below bf16's resolution near 1 (2**-7): every update
  # rounds back to the old value.
  p0 = {"w": jnp.ones((3,), jnp.bfloat16)}
  traj = [{"w": jnp.full((3,), 2.0, jnp.bfloat16)}] * 200
  _, bf16 = run(ema_jax.ema(0.999, ema_dtype=jnp.bfloat16), p0, traj)
  _, default = run(ema_jax.ema(0.999), p0, traj)
  np.testing.assert_array_equal(np.asarray(bf16[-1]["w"], np.float32), 1.0)
  expected = 2.0 - 0.999**200  # about 1.181
  np.testing.assert_allclose(default[-1]["w"], expected, rtol=1e-5)
  assert default[-1]["w"].dtype == jnp.float32


@pytest.mark.parametrize(
    "debias",
    [False, True],
)
def test_float64_params(debias):
  with _compat.enable_x64(True):
    decay, decay_at = SCHEDULES["power"]
    tx = ema_jax.ema(decay, start_step=1, update_every=2, debias=debias)
    p0, traj = trajectory({"w": jnp.zeros((3, 2), jnp.float64)}, steps=15,
                          seed=10)
    state, history = run(tx, p0, traj)
    assert state.ema["w"].dtype == jnp.float64
    expected = reference(p0, traj, decay_at, start_step=1, update_every=2,
                         debias=debias)
    # Tight: the decay and the average must both be computed in float64.
    assert_matches(history, expected, rtol=1e-12, atol=1e-12)


def test_float64_params_with_explicit_float32_ema():
  with _compat.enable_x64(True):
    p0, traj = trajectory({"w": jnp.zeros(3, jnp.float64)}, steps=5, seed=11)
    state, history = run(ema_jax.ema(0.9, ema_dtype=jnp.float32), p0, traj)
    assert state.ema["w"].dtype == jnp.float32
    assert_matches(history, reference(p0, traj, lambda j: 0.9), rtol=1e-6,
                   atol=1e-6)


# ---------------------------------------------------------------------------
# jit.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("debias", [False, True])
def test_jit_and_eager_agree(debias):
  tx = ema_jax.ema(ema_jax.warmup_decay(0.99), start_step=1, update_every=2,
                   debias=debias)
  p0, traj = trajectory(nested_tree(), steps=7, seed=12)
  _, jitted = run(tx, p0, traj, jit=True)
  _, eager = run(tx, p0, traj, jit=False)

  def as_expected(x):  # float leaves as float64, the others exactly
    if x is None:
      return None
    return np_leaf(x).astype(np.float64) if is_float(x) else np_leaf(x)

  expected = [[as_expected(x) for x in leaves(e)] for e in eager]
  # XLA may fuse differently from op-by-op dispatch: equal to rounding.
  assert_matches(jitted, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "decay, kwargs",
    [
        (0.99, {}),
        (ema_jax.power_decay(gamma=7.0), {"update_every": 3, "debias": True}),
        (ema_jax.tf_dynamic_decay(0.999), {"start_step": 2}),
    ],
)
@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_update_does_not_recompile(decay, kwargs):
  # sgd, not adam: optax's adam turns an int leaf's `mu` into a weak float on
  # the first step and retraces by itself.
  tx = optax.chain(optax.sgd(1e-2), ema_jax.ema(decay, **kwargs))
  params = {"w": jnp.ones((3, 2)), "n": jnp.zeros((), jnp.int32),
            "h": jnp.ones(2, jnp.bfloat16)}
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(6):
    params, state = step(params, state, grads)
  assert int(state[1].count) == 6
  assert len(traces) == 1


# ---------------------------------------------------------------------------
# optax.MultiSteps, buffers.
# ---------------------------------------------------------------------------


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_multisteps_moves_only_on_real_updates():
  k, lr, d = 3, 0.5, 0.8
  tx = optax.MultiSteps(optax.chain(optax.sgd(lr), ema_jax.ema(d)),
                        every_k_schedule=k)
  rng = np.random.default_rng(13)
  params = {"w": jnp.asarray(rng.normal(size=4), jnp.float32)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  p_ref = np.asarray(params["w"], np.float64)
  e_ref = p_ref.copy()
  e_every_micro = p_ref.copy()  # what a per-micro-step EMA would hold
  block = []
  for t in range(12):
    g = rng.normal(size=4)
    block.append(g)
    updates, state = step({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    if len(block) == k:
      p_ref = p_ref - lr * np.mean(block, axis=0)
      e_ref = d * e_ref + (1 - d) * p_ref
      block = []
    e_every_micro = d * e_every_micro + (1 - d) * p_ref
    got = ema_jax.ema_params(state)["w"]
    np.testing.assert_allclose(params["w"], p_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, e_ref, rtol=1e-5, atol=1e-6)
  assert int(state.inner_opt_state[1].count) == 12 // k
  # The comparison can tell the two apart.
  assert not np.allclose(e_ref, e_every_micro, atol=1e-3)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("jit_init", [False, True])
def test_init_never_aliases_params_under_donation(jit_init):
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))
  params = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.arange(3),
            "h": jnp.ones(2, jnp.bfloat16)}
  saved = jax.tree.map(np.array, params)
  state = (jax.jit(tx.init) if jit_init else tx.init)(params)

  def train_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(train_step, donate_argnums=(1,))
  grads = jax.tree.map(jnp.ones_like, params)
  old_state_leaves = jax.tree.leaves(state)
  new_params, state = step(params, state, grads)
  # Donation really happened (else this test could not fail)...
  assert any(x.is_deleted() for x in old_state_leaves)
  # ...and the params the caller still holds are intact.
  for name, p in params.items():
    assert not p.is_deleted(), name
    np.testing.assert_array_equal(np.asarray(p), saved[name])
  # Train on: a second donated step works from the returned state.
  new_params, state = step(new_params, state, grads)
  w0 = saved["w"].astype(np.float64)
  e1 = 0.9 * w0 + 0.1 * (w0 - 0.1)
  e2 = 0.9 * e1 + 0.1 * (w0 - 0.2)
  np.testing.assert_allclose(ema_jax.ema_params(state)["w"], e2, rtol=1e-6)
  np.testing.assert_array_equal(ema_jax.ema_params(state)["n"], new_params["n"])


# ---------------------------------------------------------------------------
# Non-finite values.
# ---------------------------------------------------------------------------


def test_nan_stays_while_decaying_and_a_copy_clears_it():
  p0 = {"w": jnp.zeros(2)}
  traj = [{"w": jnp.ones(2)}, {"w": jnp.array([jnp.nan, 1.0])}] + [
      {"w": jnp.ones(2)}] * 3
  _, h = run(ema_jax.ema(0.5), p0, traj)
  assert np.isnan(np.asarray(h[-1]["w"][0])) and h[-1]["w"][1] == 1 - 0.5**5
  _, h = run(ema_jax.ema(0.5, start_step=3), p0, traj)
  np.testing.assert_allclose(h[-1]["w"], [1.0, 1.0])


# ---------------------------------------------------------------------------
# Errors at build time.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"decay": 1.5}, ValueError, r"`decay` must be in \[0, 1\]"),
        ({"decay": -0.01}, ValueError, r"`decay` must be in \[0, 1\]"),
        ({"decay": True}, TypeError, r"`decay`.*bool"),
        ({"decay": "0.9x"}, TypeError, r"`decay` must be a float"),
        ({"start_step": -1}, ValueError, r"`start_step` must be in \[0, 2147483647\]"),
        ({"start_step": 1.5}, TypeError, r"`start_step` must be an int"),
        ({"update_every": 0}, ValueError, r"`update_every` must be in \[1, 2147483647\]"),
        ({"update_every": True}, TypeError, r"`update_every` must be a Python int"),
        ({"ema_dtype": jnp.int32}, ValueError, r"`ema_dtype`"),
        ({"ema_dtype": "not-a-dtype"}, TypeError, r"`ema_dtype`"),
    ],
)
def test_bad_arguments_fail_at_build_time(kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    ema_jax.ema(**kwargs)


def test_schedule_returning_wrong_shape_fails_at_build_time():
  with pytest.raises(ValueError, match=r"`decay` schedule must return a scalar"):
    ema_jax.ema(lambda count: jnp.full((2,), 0.9))


def test_schedule_with_python_if_fails_at_build_time():
  def schedule(count):
    if count < 10:  # not traceable
      return 0.0
    return 0.99

  with pytest.raises(TypeError, match=r"`decay` schedule.*jnp.where"):
    ema_jax.ema(schedule)


def test_schedule_outside_unit_interval_fails_at_build_time():
  with pytest.raises(ValueError, match=r"`decay` schedule returns 1.5"):
    ema_jax.ema(lambda count: jnp.where(count > 5, 1.5, 0.5))


# ---------------------------------------------------------------------------
# Errors at update time.
# ---------------------------------------------------------------------------


def _ema_and_state():
  tx = ema_jax.ema(0.9)
  params = {"a": {"w": jnp.zeros((2, 3))}, "n": jnp.zeros(2, jnp.int32)}
  return tx, params, tx.init(params)


def test_update_without_params_fails():
  tx, params, state = _ema_and_state()
  with pytest.raises(ValueError, match=r"needs `params`"):
    tx.update(params, state)


def test_update_with_other_structure_fails():
  tx, params, state = _ema_and_state()
  other = {"a": {"w": jnp.zeros((2, 3)), "extra": jnp.zeros(1)},
           "n": jnp.zeros(2, jnp.int32)}
  with pytest.raises(ValueError, match=r"structure"):
    tx.update(other, state, other)


def test_update_with_other_shape_names_the_leaf():
  tx, params, state = _ema_and_state()
  other = {"a": {"w": jnp.zeros((3, 2))}, "n": jnp.zeros(2, jnp.int32)}
  with pytest.raises(ValueError, match=r"\['a'\]\['w'\].*shape \(3, 2\)"):
    tx.update(other, state, other)


def test_update_with_other_dtype_names_the_leaf():
  tx, params, state = _ema_and_state()
  other = {"a": {"w": jnp.zeros((2, 3))}, "n": jnp.zeros(2, jnp.uint8)}
  with pytest.raises(ValueError, match=r"\['n'\].*uint8"):
    tx.update(other, state, other)
  with _compat.enable_x64(True):
    tx = ema_jax.ema(0.9)
    state = tx.init({"w": jnp.zeros(2, jnp.float64)})
    params = {"w": jnp.zeros(2, jnp.float32)}
    with pytest.raises(ValueError, match=r"\['w'\].*float64"):
      tx.update(params, state, params)


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_update_with_swapped_state_fails_eager_jit_and_in_chain():
  tx, params, state = _ema_and_state()
  _, swapped = ema_jax.swap(params, state)
  with pytest.raises(ValueError, match=r"swapped"):
    tx.update(params, swapped, params)
  with pytest.raises(ValueError, match=r"swapped"):
    jax.jit(tx.update)(params, swapped, params)
  chain = optax.chain(optax.adam(1e-3), ema_jax.ema(0.9))
  chain_state = chain.init(params)
  _, swapped = ema_jax.swap(params, chain_state)
  with pytest.raises(ValueError, match=r"swap\(params, opt_state\)"):
    chain.update(params, swapped, params)


# ---------------------------------------------------------------------------
# moving_average.
# ---------------------------------------------------------------------------


def _train(tx, steps=8, seed=14):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
  state = tx.init(params)
  for _ in range(steps):
    grads = {"w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize(
    "ma_kwargs, ema_args",
    [
        ({"average_decay": 0.9}, ((0.9,), {})),
        ({"average_decay": 0.8, "start_step": 3, "update_every": 2},
         ((0.8,), {"start_step": 3, "update_every": 2})),
        ({"average_decay": 0.99, "dynamic_decay": True, "start_step": 1},
         ((ema_jax.tf_dynamic_decay(0.99),), {"start_step": 1})),
    ],
)
@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_moving_average_equals_chain(ma_kwargs, ema_args):
  opt = optax.adam(0.1)
  ma_params, ma_state = _train(ema_jax.moving_average(opt, **ma_kwargs))
  args, kwargs = ema_args
  ch_params, ch_state = _train(optax.chain(opt, ema_jax.ema(*args, **kwargs)))
  chex.assert_trees_all_equal(ma_params, ch_params)
  chex.assert_trees_all_equal(ema_jax.ema_params(ma_state),
                              ema_jax.ema_params(ch_state))
  # ...and the EMA is not just the params.
  assert not np.allclose(ema_jax.ema_params(ma_state)["w"], ma_params["w"])


def test_moving_average_dynamic_decay_matches_tf_ramp():
  opt = optax.sgd(1.0)
  tx = ema_jax.moving_average(opt, 0.9, dynamic_decay=True)
  params = jnp.zeros(())
  state = tx.init(params)
  e = 0.0
  for k in range(6):
    updates, state = tx.update(jnp.asarray(-1.0), state, params)
    params = optax.apply_updates(params, updates)
    d = min(0.9, (1 + k) / (10 + k))
    e = d * e + (1 - d) * float(params)
    np.testing.assert_allclose(ema_jax.ema_params(state), e, rtol=1e-6)


def test_moving_average_bad_arguments():
  with pytest.raises(TypeError, match=r"`optimizer`"):
    ema_jax.moving_average(lambda x: x)
  with pytest.raises(TypeError, match=r"`dynamic_decay=True`"):
    ema_jax.moving_average(optax.sgd(0.1), ema_jax.constant_decay(0.9),
                           dynamic_decay=True)
  with pytest.raises(ValueError, match=r"`decay` must be in \[0, 1\]"):
    ema_jax.moving_average(optax.sgd(0.1), 1.2, dynamic_decay=True)


def test_structure_errors_name_the_differing_leaf_and_the_argument():
  tx = ema_jax.ema(0.9)
  params = {"a": {"v": jnp.ones(2), "w": jnp.ones(2)}}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"`params` do not have the structure of the EMA state \(not in params: \['a'\]\['v'\]\)"):
    tx.update({"a": {"w": jnp.ones(2)}}, state, {"a": {"w": jnp.ones(2)}})
  with pytest.raises(ValueError, match=r"`updates` do not have the structure of `params` \(missing from updates: \['a'\]\['v'\]\)"):
    tx.update({"a": {"w": jnp.ones(2)}}, state, params)
