"""bfloat16 storage with stochastic rounding: unbiased, and it keeps up.

The rounding itself is checked against neighbours and probabilities computed
in float64 from the definition; the EMA is checked on a 20k-step trajectory
against a float64 reference, a round-to-nearest bfloat16 EMA (which stalls),
and the noise level that the variance of stochastic rounding predicts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_jax
from ema_jax import _rounding

BF16 = jnp.bfloat16


def bf16_neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The bfloat16 values just below and above |x| in magnitude, in float64.

  bfloat16 keeps 8 significant bits, so around |x| in [2**k, 2**(k+1)) its
  spacing is 2**(k - 7).
  """
  mag = np.abs(x.astype(np.float64))
  ulp = 2.0 ** (np.floor(np.log2(mag)) - 7)
  lo = np.floor(mag / ulp) * ulp
  return lo, lo + ulp


def round_many(x: np.ndarray, n_keys: int) -> np.ndarray:
  keys = jax.random.split(jax.random.key(42), n_keys)
  out = jax.jit(jax.vmap(_rounding.stochastic_round, in_axes=(None, 0)))(
      jnp.asarray(x, jnp.float32), keys
  )
  assert out.dtype == BF16
  return np.asarray(out.astype(jnp.float32), np.float64)


def test_rounds_to_a_neighbour_with_probability_given_by_distance():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=64) * 10.0 ** rng.integers(-6, 6, size=64)).astype(np.float32)
  lo, hi = bf16_neighbours(x)
  n = 4096
  out = np.abs(round_many(x, n))
  assert np.all((out == lo) | (out == hi))
  p_up = (np.abs(x.astype(np.float64)) - lo) / (hi - lo)
  freq_up = (out == hi).mean(axis=0)
  sigma = np.sqrt(p_up * (1 - p_up) / n) + 1.0 / n
  assert np.all(np.abs(freq_up - p_up) < 5 * sigma), np.max(np.abs(freq_up - p_up) / sigma)
  # Unbiased: the mean of the rounded values is x, to sampling error.
  mean = round_many(x, n).mean(axis=0)
  err_sigma = (hi - lo) * np.sqrt(p_up * (1 - p_up) / n) + (hi - lo) / n
  assert np.all(np.abs(mean - x) <= 5 * err_sigma)


@pytest.mark.parametrize("frac", [0.01, 0.3, 0.5, 0.9])
def test_across_elements_of_one_array_rounding_is_uniform_and_independent(frac):
  # One key, one array: the random bits vary with the element index.
  shape = (256, 512)
  x = np.full(shape, 1.0 + frac * 2.0**-7, np.float32)  # ulp is 2**-7 at 1
  out = np.asarray(
      _rounding.stochastic_round(jnp.asarray(x), jax.random.key(11)).astype(jnp.float32)
  )
  up = out > 1.0
  assert np.all(out[up] == 1.0 + 2.0**-7) and np.all(out[~up] == 1.0)
  n = up.size
  assert abs(up.mean() - frac) < 5 * np.sqrt(frac * (1 - frac) / n)
  # Neighbours (along rows and columns) round independently: P(both) = p**2.
  for pair in (up[:, 1:] & up[:, :-1], up[1:, :] & up[:-1, :]):
    assert abs(pair.mean() - frac**2) < 5 * np.sqrt(frac**2 * (1 - frac**2) / pair.size)


def test_same_values_sharded_or_not():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  x = np.random.default_rng(2).normal(size=(16, 24)).astype(np.float32)
  key = jax.random.key(4)
  single = _rounding.stochastic_round(jnp.asarray(x), key)
  P = jax.sharding.PartitionSpec
  for spec in [P("data", "model"), P("model", None), P()]:
    xs = jax.device_put(x, jax.NamedSharding(mesh, spec))
    sharded = jax.jit(_rounding.stochastic_round)(xs, key)
    assert sharded.sharding.is_equivalent_to(xs.sharding, 2)
    np.testing.assert_array_equal(
        np.asarray(sharded.astype(jnp.float32)), np.asarray(single.astype(jnp.float32))
    )


def test_sign_exact_values_and_specials():
  rng = np.random.default_rng(1)
  x = rng.normal(size=256).astype(np.float32)
  key = jax.random.key(3)
  pos = _rounding.stochastic_round(jnp.asarray(x), key)
  neg = _rounding.stochastic_round(jnp.asarray(-x), key)
  np.testing.assert_array_equal(np.asarray(-pos), np.asarray(neg))
  exact = np.asarray(jnp.asarray(x).astype(BF16).astype(jnp.float32))
  for seed in range(5):
    out = _rounding.stochastic_round(jnp.asarray(exact), jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), exact)
  specials = jnp.array(
      [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40], jnp.float32
  )
  out = np.asarray(
      _rounding.stochastic_round(specials, key).astype(jnp.float32)
  )
  assert np.isnan(out[0]) and np.isnan(out[1])
  assert out[2] == np.inf and out[3] == -np.inf
  assert out[4] == 0 and out[5] == 0 and np.signbit(out[5])
  assert 0 <= out[6] <= 1e-39  # subnormal: rounds to a neighbour, 0 or up


def test_options_are_checked_when_built():
  with pytest.raises(ValueError, match="ema_dtype=jnp.bfloat16"):
    ema_jax.ema(0.999, rounding="stochastic")
  with pytest.raises(ValueError, match="ema_dtype=jnp.bfloat16"):
    ema_jax.ema(0.999, ema_dtype=jnp.float16, rounding="stochastic")
  with pytest.raises(ValueError, match="`rounding`"):
    ema_jax.ema(0.999, ema_dtype=BF16, rounding="up")
  with pytest.raises(TypeError, match="`key`"):
    ema_jax.ema(0.999, ema_dtype=BF16, rounding="stochastic", key="seed")
  # A state made without a key cannot be updated with stochastic rounding.
  params = jnp.ones(3, BF16)
  state = ema_jax.ema(0.9, ema_dtype=BF16).init(params)
  tx = ema_jax.ema(0.9, ema_dtype=BF16, rounding="stochastic")
  with pytest.raises(ValueError, match="rounding_key"):
    tx.update(jnp.zeros_like(params), state, params)


def run_steps(tx, params, n, state=None, start=0):
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(state, i):
    p = params + 0.01 * jnp.sin(i + jnp.arange(params.size, dtype=jnp.float32))
    _, state = tx.update(jnp.zeros_like(params), state, p.astype(params.dtype))
    return state

  for i in range(start, start + n):
    state = step(state, float(i))
  return state


def test_key_lives_in_the_state_and_resuming_reproduces_the_run():
  params = jnp.linspace(-1, 1, 64, dtype=jnp.float32)
  tx = ema_jax.ema(0.99, ema_dtype=BF16, rounding="stochastic", key=7)
  state = tx.init(params)
  assert isinstance(state, ema_jax.EmaState)
  assert jnp.issubdtype(state.rounding_key.dtype, jax.dtypes.prng_key)
  straight = run_steps(tx, params, 12)
  # Stop after 5 steps, go through host memory (as a checkpoint does), resume.
  half = jax.device_get(run_steps(tx, params, 5))
  half = jax.tree.map(jnp.asarray, half)
  resumed = run_steps(tx, params, 7, state=half, start=5)
  np.testing.assert_array_equal(
      np.asarray(resumed.ema, np.float32), np.asarray(straight.ema, np.float32)
  )
  assert not np.array_equal(
      jax.random.key_data(straight.rounding_key),
      jax.random.key_data(state.rounding_key),
  )
  # Another key gives another (equally valid) rounding.
  other = run_steps(
      ema_jax.ema(0.99, ema_dtype=BF16, rounding="stochastic", key=8), params, 12
  )
  assert not np.array_equal(np.asarray(other.ema, np.float32), np.asarray(straight.ema, np.float32))
  # Eager and jitted updates agree bit for bit.
  eager_state = tx.init(params)
  jit_state = tx.init(params)
  for i in range(3):
    p = params * (1.0 - 0.1 * i)
    _, eager_state = tx.update(jnp.zeros_like(p), eager_state, p)
    _, jit_state = jax.jit(tx.update)(jnp.zeros_like(p), jit_state, p)
  np.testing.assert_array_equal(
      np.asarray(eager_state.ema, np.float32), np.asarray(jit_state.ema, np.float32)
  )


def test_swap_and_skipped_updates_keep_the_key_and_the_average():
  params = jnp.linspace(-1, 1, 16, dtype=BF16)
  tx = optax.chain(
      optax.sgd(0.1),
      ema_jax.ema(0.9, ema_dtype=BF16, rounding="stochastic", update_every=2),
  )
  state = tx.init(params)
  grads = jnp.ones_like(params)
  updates, state = tx.update(grads, state, params)  # skipped (1 of 2)
  np.testing.assert_array_equal(
      np.asarray(ema_jax.ema_params(state), np.float32), np.asarray(params, np.float32)
  )
  params = optax.apply_updates(params, updates)
  updates, state = tx.update(grads, state, params)  # averaged
  params = optax.apply_updates(params, updates)
  ema_weights, swapped = ema_jax.swap(params, state)
  assert swapped[1].rounding_key is state[1].rounding_key
  params_back, state_back = ema_jax.swap(ema_weights, swapped)
  assert state_back[1].rounding_key is state[1].rounding_key
  _, state_next = tx.update(grads, state_back, params_back)  # still updatable
  assert int(state_next[1].count) == 3


def test_memory_is_half_of_float32():
  params = {"w": jnp.zeros((256, 128), jnp.float32), "b": jnp.zeros(128, BF16)}
  f32 = ema_jax.ema(0.999).init(params)
  sr = ema_jax.ema(0.999, ema_dtype=BF16, rounding="stochastic").init(params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  n = 256 * 128 + 128
  assert nbytes(f32.ema) == 4 * n
  assert nbytes(sr.ema) == 2 * n


# The long trajectory: 1024 bfloat16 params, each drifting slowly (a sine with
# a period of 5k to 40k steps, amplitude 0.5 around 1) plus noise (0.05),
# averaged with decay 0.999 for 20k steps.
STEPS, WIDTH, DECAY, EVERY = 20_000, 1024, 0.999, 10


def trajectory() -> np.ndarray:
  rng = np.random.default_rng(0)
  t = np.arange(STEPS + 1)[:, None]
  phase = rng.uniform(0, 2 * np.pi, WIDTH)
  period = rng.uniform(5_000, 40_000, WIDTH)
  p = 1 + 0.5 * np.sin(2 * np.pi * t / period + phase)
  p += 0.05 * rng.normal(size=(STEPS + 1, WIDTH))
  return np.asarray(p.astype(BF16))


def ema_every_10_steps(tx, traj: np.ndarray) -> np.ndarray:
  """The EMA after steps 10, 20, ..., STEPS, with the whole run in one lax.scan."""

  @jax.jit
  def run(traj):
    state = tx.init(traj[0])

    def step(state, p):
      # The EMA is of params + updates: pass the new params, zero updates.
      _, state = tx.update(jnp.zeros_like(p), state, p)
      return state, None

    def ten_steps(state, ps):
      state, _ = jax.lax.scan(step, state, ps)
      return state, ema_jax.ema_params(state).astype(jnp.float32)

    _, out = jax.lax.scan(ten_steps, state, traj[1:].reshape(-1, EVERY, WIDTH))
    return out

  return np.asarray(run(jnp.asarray(traj)), np.float64)


def test_long_trajectory_tracks_float32_ema_while_nearest_rounding_stalls():
  traj = trajectory()
  p = traj.astype(np.float64)
  # Reference in float64, from the definition; and the noise stochastic
  # rounding should add: rounding e + D up or down by one ulp has variance
  # about |D| * ulp (for |D| < ulp), and the EMA keeps a decaying sum of
  # these errors, so its variance is about mean(|D| * ulp) / (1 - decay**2).
  e = p[0].copy()
  ref, round_var = [], []
  for t in range(1, STEPS + 1):
    delta = (1 - DECAY) * (p[t] - e)
    if t > STEPS // 2:
      ulp = 2.0 ** (np.floor(np.log2(np.abs(e))) - 7)
      round_var.append(np.minimum(np.abs(delta), ulp) * ulp)
    e = e + delta
    if t % EVERY == 0:
      ref.append(e.copy())
  ref = np.array(ref)
  predicted_rms = np.sqrt(np.mean(round_var) / (1 - DECAY**2))

  f32 = ema_every_10_steps(ema_jax.ema(DECAY), traj)
  nearest = ema_every_10_steps(ema_jax.ema(DECAY, ema_dtype=BF16), traj)
  stochastic = ema_every_10_steps(
      ema_jax.ema(DECAY, ema_dtype=BF16, rounding="stochastic", key=0), traj
  )

  half = len(ref) // 2  # judge the second half, after the start-up transient
  rms = lambda x: float(np.sqrt(np.mean((x[half:] - ref[half:]) ** 2)))
  motion = np.mean(np.abs(ref[-1] - ref[half]))  # how far the EMA moves
  assert motion > 0.3

  # The float32 EMA (ema_jax's default for bfloat16 params) is the reference.
  assert np.max(np.abs(f32 - ref)) < 2e-5

  # Round-to-nearest bfloat16 stalls: 0.001 * (p - e) is below half an ulp
  # (2**-8 near 1) unless p is 3.9 away, so the average barely moves.
  nearest_motion = np.mean(np.abs(nearest[-1] - nearest[half]))
  assert nearest_motion < 0.05 * motion, (nearest_motion, motion)
  assert rms(nearest) > 0.3

  # Stochastic rounding tracks it, with the noise the variance predicts
  # (measured 0.0183 against 0.0183 predicted: 2.3 bfloat16 ulps at 1.0, 4%
  # of the motion; round-to-nearest of the exact EMA would be 0.0018),
  # and no bias.
  assert 0.85 * predicted_rms < rms(stochastic) < 1.15 * predicted_rms, (
      rms(stochastic), predicted_rms)
  assert rms(stochastic) < 0.05 * motion
  assert rms(nearest) > 20 * rms(stochastic)
  bias = np.mean(stochastic[half:] - ref[half:])
  assert abs(bias) < 1e-3, bias  # an eighth of an ulp
  stochastic_motion = np.mean(np.abs(stochastic[-1] - stochastic[half]))
  assert abs(stochastic_motion - motion) < 0.05 * motion


@pytest.mark.parametrize("key", [7, "typed"], ids=["int-seed", "typed-key"])
def test_each_init_gets_its_own_key_buffer(key):
  # Donating one state (a `donate_argnums` step) deletes its buffers: the key
  # must not be shared with the transformation, the next `init` or the caller.
  key = jax.random.key(7) if key == "typed" else key
  tx = ema_jax.ema(0.9, ema_dtype=jnp.bfloat16, rounding="stochastic", key=key)
  params = {"w": jnp.ones(3)}
  first = tx.init(params)
  step = jax.jit(lambda s: tx.update(params, s, params)[1], donate_argnums=0)
  step(first)
  assert first.rounding_key.is_deleted()
  second = tx.init(params)  # a new state, not the deleted key
  assert not second.rounding_key.is_deleted()
  assert jnp.array_equal(jax.random.key_data(second.rounding_key),
                         jax.random.key_data(jax.random.key(7)))
  if not isinstance(key, int):
    assert not key.is_deleted()  # the caller's key is the caller's
