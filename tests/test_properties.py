"""Hypothesis property tests: swap, the update_every horizon, presets' first steps."""

from __future__ import annotations

from typing import Any

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_jax
from _util import Pair, assert_bitwise_equal, is_float, is_key, leaves

SETTINGS = hypothesis.settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: no flaky CI
    database=None,
)





# ---------------------------------------------------------------------------
# Random trees: specs drawn by hypothesis, arrays made from a drawn seed.
# ---------------------------------------------------------------------------

DTYPES = ["float32", "bfloat16", "float16", "int32", "bool", "key"]

leaf_specs = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(DTYPES),
        st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    ),
)


def _containers(children):
  return st.one_of(
      st.dictionaries(st.sampled_from("abcde"), children, min_size=1,
                      max_size=3),
      st.lists(children, min_size=1, max_size=3),
      st.tuples(children, children),
      st.builds(Pair, children, children),
  )


tree_specs = st.recursive(leaf_specs, _containers, max_leaves=6)


def is_spec(x: Any) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def materialize(spec: Any, rng: np.random.Generator) -> Any:
  def one(s):
    if s is None:
      return None
    dtype, shape = s
    if dtype == "key":
      return jax.random.key(int(rng.integers(0, 2**31)))
    if dtype == "bool":
      return jnp.asarray(rng.random(shape) < 0.5)
    if dtype == "int32":
      return jnp.asarray(rng.integers(-50, 50, size=shape), jnp.int32)
    return jnp.asarray(rng.normal(size=shape), dtype)

  return jax.tree.map(one, spec, is_leaf=lambda x: x is None or is_spec(x))


def next_params(params: Any, rng: np.random.Generator) -> Any:
  """New random values of the same kinds (keys get split)."""

  def one(x):
    if is_key(x):
      return jax.random.split(x)[0]
    if is_float(x):
      return jnp.asarray(rng.normal(size=x.shape), x.dtype)
    if x.dtype == bool:
      return jnp.asarray(rng.random(x.shape) < 0.5)
    return jnp.asarray(rng.integers(-50, 50, size=x.shape), x.dtype)

  return jax.tree.map(one, params)


def zero_updates(params: Any) -> Any:
  return jax.tree.map(lambda x: None if is_key(x) else jnp.zeros_like(x),
                      params)


# ---------------------------------------------------------------------------
# swap twice = identity.
# ---------------------------------------------------------------------------


@SETTINGS
@hypothesis.given(
    spec=tree_specs,
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(0, 3),
    decay=st.floats(0.0, 1.0),
    debias=st.booleans(),
    use_mask=st.booleans(),
    ema_dtype=st.sampled_from([None, "float32", "bfloat16"]),
    wrapped=st.booleans(),
)
def test_swap_twice_is_identity(spec, seed, steps, decay, debias, use_mask,
                                ema_dtype, wrapped):
  rng = np.random.default_rng(seed)
  params = materialize(spec, rng)
  mask = None
  if use_mask:
    mask_bits = iter(rng.random(64) < 0.5)
    mask = jax.tree.map(lambda _: bool(next(mask_bits)), params)
  ema = ema_jax.ema(decay, debias=debias, ema_dtype=ema_dtype, mask=mask)
  tx = optax.chain(optax.identity(), ema) if wrapped else ema
  state = tx.init(params)
  for _ in range(steps):
    params = next_params(params, rng)
    _, state = tx.update(zero_updates(params), state, params)

  swapped_params, swapped_state = ema_jax.swap(params, state)
  back_params, back_state = ema_jax.swap(swapped_params, swapped_state)
  assert_bitwise_equal(back_params, params)
  assert_bitwise_equal(back_state, state)
  # What went out is the EMA, leaf for leaf (params where the mask excludes).
  for p, e, s in zip(leaves(params), leaves(ema_jax.ema_params(state)),
                     leaves(swapped_params)):
    if e is None:
      assert s is p
    else:
      assert_bitwise_equal(s, e)


# ---------------------------------------------------------------------------
# update_every=k keeps the horizon.
# ---------------------------------------------------------------------------
#
# The property. Let s(j) be any schedule, S = start_step, k = update_every,
# and p_1..p_T the params after each update. With update_every=k the EMA
# copies p_t for t <= S, then moves only at the ends of the blocks
# B_m = {S + m k + 1, ..., S + (m + 1) k} (t counted from 1), there by
#     e <- D_m e + (1 - D_m) p_end,   D_m = prod_{t in B_m} s(t - S - 1).
# With update_every=1 and the params q_t = p_end(B_m) for t in B_m (constant
# over each block), the k per-step updates of a block compose to
#     e <- (prod_t s) e + (1 - prod_t s) q = D_m e + (1 - D_m) p_end,
# since a run of EMA steps towards a constant q keeps e - q scaled by each
# decay. So at every block end the two EMAs are equal, whatever the schedule:
# averaging every k steps with the compensated decay has the same horizon in
# steps as averaging every step. Within a block the update_every=k EMA stays
# at its value from the previous block end (or the copy phase).

SCHEDULES = {
    "constant": lambda a: float(a),
    "power": lambda a: ema_jax.power_decay(gamma=20.0 * a),
    "warmup": lambda a: ema_jax.warmup_decay(0.999, power=0.5 + 0.5 * a),
    "tf": lambda a: ema_jax.tf_dynamic_decay(0.9 + 0.099 * a),
}


def _ema_history(tx, p0, traj):
  state = tx.init(p0)
  out = []
  for p in traj:
    _, state = tx.update(jnp.zeros_like(p), state, p)
    out.append(np.asarray(state.ema, np.float64))
  return out


@SETTINGS
@hypothesis.given(
    k=st.integers(1, 5),
    start_step=st.integers(0, 4),
    steps=st.integers(1, 20),
    schedule=st.sampled_from(sorted(SCHEDULES)),
    a=st.floats(0.0, 0.999),
    seed=st.integers(0, 2**32 - 1),
)
def test_update_every_keeps_the_horizon(k, start_step, steps, schedule, a,
                                        seed):
  rng = np.random.default_rng(seed)
  decay = SCHEDULES[schedule](a)
  p0 = jnp.asarray(rng.normal(size=3), jnp.float32)
  traj = [jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(steps)]

  def block_end(t):  # t is 1-based
    if t <= start_step:
      return t
    m = (t - start_step - 1) // k
    return start_step + (m + 1) * k

  complete = [t for t in range(1, steps + 1) if block_end(t) <= steps]
  q = [traj[block_end(t) - 1] for t in complete]

  every_k = _ema_history(
      ema_jax.ema(decay, start_step=start_step, update_every=k), p0, traj)
  every_1 = _ema_history(ema_jax.ema(decay, start_step=start_step), p0, q)
  last_end = np.asarray(p0, np.float64)
  for t in range(1, steps + 1):
    got = every_k[t - 1]
    if t == block_end(t):  # a block end (or the copy phase)
      np.testing.assert_allclose(got, every_1[t - 1], rtol=1e-5, atol=1e-5,
                                 err_msg=f"t={t}")
      last_end = got
    else:
      np.testing.assert_array_equal(got, last_end, err_msg=f"t={t}")


@SETTINGS
@hypothesis.given(
    k=st.integers(2, 8),
    decay=st.floats(0.5, 0.999),
    blocks=st.integers(1, 6),
)
def test_constant_decay_update_every_closed_form(k, decay, blocks):
  # A step from 0 to 1 at the first update: with update_every=k the EMA at
  # step n = m k is 1 - decay**n, the same as update_every=1 at that step.
  tx = ema_jax.ema(decay, update_every=k)
  state = tx.init(jnp.zeros(()))
  for n in range(1, blocks * k + 1):
    _, state = tx.update(jnp.zeros(()), state, jnp.ones(()))
    expected = 1 - decay ** (n - n % k)
    np.testing.assert_allclose(float(state.ema), expected, rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------
# Presets' first steps.
# ---------------------------------------------------------------------------


def _run_preset(tx, p0, traj):
  """The EMA after each update, for the params `traj` (zero updates)."""
  state = tx.init(p0)
  history = []
  for p in traj:
    _, state = tx.update(jnp.zeros_like(p), state, p)
    history.append(ema_jax.ema_params(state))
  return history


trajectories = st.integers(0, 2**32 - 1).map(
    lambda seed: [jnp.asarray(x, jnp.float32) for x in
                  np.random.default_rng(seed).normal(size=(12, 3))])


@SETTINGS
@hypothesis.given(momentum=st.floats(0.0, 1.0), traj=trajectories,
                  p0=st.floats(-1e3, 1e3))
def test_keras_first_steps(momentum, traj, p0):
  history = _run_preset(ema_jax.presets.keras(momentum),
                        jnp.full(3, p0, jnp.float32), traj[:3])
  # e_1 = p_1 exactly, whatever the initial params; then m e + (1 - m) p.
  assert_bitwise_equal(history[0], traj[0])
  e = np.asarray(traj[0], np.float64)
  for p, h in zip(traj[1:3], history[1:3]):
    e = momentum * e + (1 - momentum) * np.asarray(p, np.float64)
    np.testing.assert_allclose(h, e, rtol=1e-5, atol=1e-6)


def _timm_like_decay(s, decay, min_decay, warmup, gamma, power, default):
  if warmup:
    return max(min(1 - (1 + s / gamma) ** -power, decay), min_decay)
  if default == "constant":
    return decay
  return max(min((1 + s) / (10 + s), decay), min_decay)


@SETTINGS
@hypothesis.given(
    library=st.sampled_from(["timm", "diffusers"]),
    decay=st.floats(0.5, 1.0),
    min_frac=st.floats(0.0, 1.0),
    update_after_step=st.integers(0, 5),
    warmup=st.booleans(),
    gamma=st.floats(0.5, 10.0),
    power=st.floats(0.5, 1.0),
    traj=trajectories,
)
def test_timm_diffusers_first_steps(library, decay, min_frac,
                                    update_after_step, warmup, gamma, power,
                                    traj):
  min_decay = decay * min_frac
  if library == "timm":
    tx = ema_jax.presets.timm(decay, min_decay=min_decay, use_warmup=warmup,
                              warmup_gamma=gamma, warmup_power=power,
                              update_after_step=update_after_step)
    default = "constant"
  else:
    tx = ema_jax.presets.diffusers(decay, min_decay=min_decay,
                                   update_after_step=update_after_step,
                                   use_ema_warmup=warmup, inv_gamma=gamma,
                                   power=power)
    default = "tf"
  u = update_after_step
  n = u + 3
  history = _run_preset(tx, jnp.full(3, 7.0, jnp.float32), traj[:n])
  # Both call with step t = 1, 2, ... and use s = max(0, t - u - 1): the
  # first u + 1 updates copy; the next two average with the decay at s = 1, 2.
  for t in range(1, u + 2):
    assert_bitwise_equal(history[t - 1], traj[t - 1])
  e = np.asarray(traj[u], np.float64)
  for s in (1, 2):
    d = _timm_like_decay(s, decay, min_decay, warmup, gamma, power, default)
    e = d * e + (1 - d) * np.asarray(traj[u + s], np.float64)
    np.testing.assert_allclose(history[u + s], e, rtol=1e-5, atol=1e-6)


@SETTINGS
@hypothesis.given(
    average_decay=st.floats(0.0, 1.0),
    start_step=st.integers(0, 5),
    dynamic=st.booleans(),
    traj=trajectories,
)
def test_tfa_first_steps(average_decay, start_step, dynamic, traj):
  p0 = jnp.asarray([1.0, -2.0, 3.0])
  tx = ema_jax.presets.tfa(average_decay, start_step=start_step,
                           dynamic_decay=dynamic)
  history = _run_preset(tx, p0, traj[:start_step + 2])
  for t in range(start_step):
    assert_bitwise_equal(history[t], traj[t])
  e = np.asarray(traj[start_step - 1] if start_step else p0, np.float64)
  for j in (0, 1):  # j = updates since start_step
    d = min(average_decay, (1 + j) / (10 + j)) if dynamic else average_decay
    e = d * e + (1 - d) * np.asarray(traj[start_step + j], np.float64)
    np.testing.assert_allclose(history[start_step + j], e, rtol=1e-5,
                               atol=1e-6)


@SETTINGS
@hypothesis.given(
    beta=st.floats(0.5, 1.0),
    update_after_step=st.integers(0, 6),
    update_every=st.integers(1, 4),
    traj=trajectories,
)
def test_ema_pytorch_first_steps(beta, update_after_step, update_every, traj):
  tx = ema_jax.presets.ema_pytorch(beta, update_after_step=update_after_step,
                                   update_every=update_every)
  history = _run_preset(tx, jnp.full(3, -5.0, jnp.float32), traj[:10])
  # Call k = 0 copies; later calls act when k % update_every == 0, copying
  # while k <= update_after_step, else lerping with epoch = k - U.
  e = None
  for k in range(10):
    p = np.asarray(traj[k], np.float64)
    if k == 0 or (k % update_every == 0 and k <= update_after_step):
      e = p
      assert_bitwise_equal(history[k], traj[k])
      continue
    if k % update_every == 0 and beta < 1.0:  # beta == 1: `is_frozen`
      epoch = k - update_after_step
      d = max(min(1 - (1 + epoch / 1.0) ** (-2 / 3), beta), 0.0)
      e = d * e + (1 - d) * p
    np.testing.assert_allclose(history[k], e, rtol=1e-5, atol=1e-6,
                               err_msg=f"k={k}")
