"""Teachers, targets and write-back, against the published formulas in float64.

The references are written from the papers' and repositories' own loops, in
NumPy float64, independently of ema_jax: BYOL's target update with its cosine
momentum, EDM's training-loop EMA (`ema_halflife_kimg`, `ema_rampup_ratio`),
SWA's running mean, SAC/TD3's soft target update and DQN's hard copy. Then
`blend` and `reset`, and the gradient of a loss that reads the teacher.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

import ema_jax
from _util import assert_bitwise_equal
from test_offload import HOST, make_mesh, make_params, needs_memory_spaces

SHAPE = (3, 4)


def trajectory(steps: int, seed: int = 0, dtype=jnp.float32):
  """`p_0` and the params after each of `steps` SGD updates, as arrays."""
  rng = np.random.default_rng(seed)
  p0 = jnp.asarray(rng.normal(size=SHAPE), dtype)
  grads = [jnp.asarray(rng.normal(size=SHAPE), dtype) for _ in range(steps)]
  return p0, grads


def run(tx, p0, grads, jit=True):
  """Train with `optax.chain(sgd(1), tx)`: the params and EMA after each update."""
  chain = optax.chain(optax.sgd(1.0), tx)

  def step(params, state, g):
    updates, state = chain.update(g, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  params, state = p0, chain.init(p0)
  ps, es = [], []
  for g in grads:
    params, state = step(params, state, g)
    ps.append(np.asarray(params, np.float64))
    es.append(np.asarray(ema_jax.ema_params(state), np.float64))
  return ps, es, state


# ---------------------------------------------------------------------------
# Decays in the published loops.
# ---------------------------------------------------------------------------


def byol_target(online, base_ema, max_steps):
  """deepmind-research byol/byol_experiment.py: target = EMA of the online
  params; `tau = 1 - (1 - base_ema) * (cos(pi k / K) + 1) / 2` at global step
  `k` (0 at the first update, `min(k, K)`), target initialised from p_0 here."""
  target = online[0]
  out = []
  for k, y in enumerate(online[1:]):
    k = min(k, max_steps)
    tau = 1.0 - (1.0 - base_ema) * (math.cos(math.pi * k / max_steps) + 1) / 2
    target = target + (1.0 - tau) * (y - target)
    out.append(target)
  return out


@pytest.mark.parametrize("base_ema, max_steps", [(0.9, 20), (0.5, 7)])
def test_cosine_decay_is_byols_target_update(base_ema, max_steps):
  p0, grads = trajectory(30)
  ps, es, _ = run(ema_jax.ema(ema_jax.cosine_decay(base_ema, steps=max_steps)),
                  p0, grads)
  want = byol_target([np.asarray(p0, np.float64)] + ps, base_ema, max_steps)
  np.testing.assert_allclose(es, want, rtol=1e-5, atol=1e-5)
  # After K steps the momentum is 1: the target is frozen.
  np.testing.assert_array_equal(es[-1], es[max_steps])


def test_cosine_decay_to_another_end():
  # `end` below 1 and `start` above `end`: the formula as the issue states it.
  for start, end in ((0.2, 0.9), (0.9, 0.3)):
    schedule = ema_jax.cosine_decay(start, end, steps=10)
    k = np.arange(0, 25)
    want = end - (end - start) * (np.cos(np.pi * np.minimum(k, 10) / 10) + 1) / 2
    got = np.asarray(jax.vmap(schedule)(jnp.asarray(k)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    weight = np.asarray(jax.vmap(schedule.weight)(jnp.asarray(k)))
    np.testing.assert_allclose(weight, 1 - want, rtol=1e-6, atol=1e-7)


def test_cosine_decay_weight_near_the_end_is_exact():
  # 1 - decay one step before K is (1 - tau_base) sin^2(pi / 2K): 1e-11 here,
  # which `1 - float32(decay)` would round to 0.
  schedule = ema_jax.cosine_decay(0.996, steps=100_000)
  want = 0.004 * math.sin(math.pi / 200_000) ** 2
  assert float(schedule.weight(99_999)) == pytest.approx(want, rel=1e-5)
  assert float(schedule.weight(100_000)) == 0.0


def edm_ema(params, halflife_nimg, batch_size, rampup_ratio):
  """EDM training/training_loop.py: after each optimizer step,
  `h = min(halflife, cur_nimg * ratio)`, `beta = 0.5 ** (batch / max(h, 1e-8))`,
  `ema = lerp(net, ema, beta)`, then `cur_nimg += batch`; `cur_nimg` counts
  the images seen before this step (0 at the first), `ema` starts as a copy."""
  ema, cur_nimg, out = params[0], 0, []
  for p in params[1:]:
    h = halflife_nimg
    if rampup_ratio is not None:
      h = min(h, cur_nimg * rampup_ratio)
    beta = 0.5 ** (batch_size / max(h, 1e-8))
    ema = p + (ema - p) * beta
    out.append(ema)
    cur_nimg += batch_size
  return out


@pytest.mark.parametrize(
    "halflife, batch_size, rampup_ratio",
    [(500.0, 64, None), (2_000.0, 64, 0.5), (10.0, 1, None), (10.0, 1, 0.3),
     (5_000.0, 512, 0.05)],
)
def test_half_life_decay_is_edms_training_loop(halflife, batch_size, rampup_ratio):
  # The k-th averaged update (k = 0, 1, ...) is EDM's step with
  # cur_nimg = k * batch_size.
  p0, grads = trajectory(40, seed=1)
  decay = ema_jax.half_life_decay(halflife, batch_size=batch_size,
                                  rampup_ratio=rampup_ratio)
  ps, es, _ = run(ema_jax.ema(decay), p0, grads)
  want = edm_ema([np.asarray(p0, np.float64)] + ps, halflife, batch_size,
                 rampup_ratio)
  np.testing.assert_allclose(es, want, rtol=1e-5, atol=1e-5)
  if rampup_ratio is not None:  # cur_nimg = 0: the first update copies
    np.testing.assert_array_equal(es[0], ps[0])


def test_half_life_decay_in_steps_is_unchanged():
  for h in (1.0, 4.0, 693.1, 1e6):
    old = 0.5 ** (1 / h)
    new = ema_jax.half_life_decay(h)
    assert new(7) == ema_jax.half_life_decay(h, batch_size=1)(7)
    assert float(new(7)) == pytest.approx(old, rel=1e-7)
    assert float(new.weight(7)) == pytest.approx(1 - old, rel=1e-6)
  assert repr(ema_jax.half_life_decay(100.0)) == "half_life_decay(100.0)"
  # A half-life in samples with batch B is one of H / B steps.
  a = ema_jax.half_life_decay(6400.0, batch_size=64)
  b = ema_jax.half_life_decay(100.0)
  assert float(a.weight(0)) == pytest.approx(float(b.weight(0)), rel=1e-12)


@pytest.mark.parametrize("start_step", [0, 1, 4])
@pytest.mark.parametrize("jit", [True, False])
def test_uniform_decay_is_the_running_mean(start_step, jit):
  p0, grads = trajectory(15, seed=2)
  tx = ema_jax.ema(ema_jax.uniform_decay(), start_step=start_step)
  ps, es, _ = run(tx, p0, grads, jit=jit)
  for n in range(1, len(ps) + 1):  # after update n
    if n <= start_step:
      want = ps[n - 1]  # copying before averaging starts
    else:
      want = np.mean(ps[start_step:n], axis=0)  # updates s+1 ... n
    np.testing.assert_allclose(es[n - 1], want, rtol=1e-5, atol=1e-6,
                               err_msg=f"after update {n}")


def test_uniform_decay_every_c_updates_is_the_mean_of_those_params():
  # SWA with a cycle: the mean of the params after updates c, 2c, ...
  c = 3
  p0, grads = trajectory(15, seed=3)
  ps, es, _ = run(ema_jax.ema(ema_jax.uniform_decay(), update_every=c), p0, grads)
  for n in range(c, len(ps) + 1, c):
    want = np.mean(ps[c - 1:n:c], axis=0)
    np.testing.assert_allclose(es[n - 1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [0.5, 2.0, 3.0, 7.5])
def test_scale_decay_is_a_power_of_the_decay(factor):
  k = np.arange(0, 300)
  cases = [
      (0.999, np.full(k.shape, 0.999)),
      (ema_jax.warmup_decay(0.99, power=0.75),
       np.minimum(1 - (1 + k) ** -0.75, 0.99)),
      (ema_jax.power_decay(gamma=6.94), (1 - 1 / (k + 1.0)) ** 7.94),
      (lambda count: jnp.minimum(0.9, count.astype(jnp.float32) / 100.0),
       np.minimum(0.9, k / 100)),
  ]
  for decay, base in cases:
    schedule = ema_jax.scale_decay(decay, factor)
    got = np.asarray(jax.vmap(schedule)(jnp.asarray(k, jnp.int32)), np.float64)
    np.testing.assert_allclose(got, base**factor, rtol=2e-6, atol=1e-7)
    weight = np.asarray(jax.vmap(schedule.weight)(jnp.asarray(k, jnp.int32)))
    np.testing.assert_allclose(weight, 1 - base**factor, rtol=1e-5, atol=1e-7)


def test_scale_decay_keeps_the_weight_exact():
  # 1 - 0.9999999 ** 2 = 2e-7 - 1e-14: float32 1 - decay would be 2.38e-7.
  w = float(ema_jax.scale_decay(0.9999999, 2).weight(0))
  assert w == pytest.approx(-math.expm1(2 * math.log1p(-1e-7)), rel=1e-6)


def test_scale_decay_of_k_steps_matches_update_every_k():
  # Busbridge et al.: a batch k times larger, k times fewer steps: one update
  # with decay d**k lands where k updates with d towards the same params do.
  k = 4
  p0, grads = trajectory(24, seed=4)
  big = [sum(grads[i:i + k]) / k for i in range(0, len(grads), k)]
  _, es_scaled, _ = run(ema_jax.ema(ema_jax.scale_decay(0.9, k)), p0,
                        [g * k for g in big])
  ps_hold = []
  params = np.asarray(p0, np.float64)
  for g in big:  # the same params held for k steps
    params = params - k * np.asarray(g, np.float64)
    ps_hold.extend([params] * k)
  ema = np.asarray(p0, np.float64)
  for i, p in enumerate(ps_hold):
    ema = 0.9 * ema + 0.1 * p
    if (i + 1) % k == 0:
      np.testing.assert_allclose(es_scaled[i // k], ema, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# RL targets.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.005, 0.1])
def test_soft_target_update(tau):
  # SAC/TD3: target <- tau * theta + (1 - tau) * target after every update.
  p0, grads = trajectory(50, seed=5)
  ps, es, _ = run(ema_jax.ema(1 - tau), p0, grads)
  target = np.asarray(p0, np.float64)
  for p, e in zip(ps, es):
    target = tau * p + (1 - tau) * target
    np.testing.assert_allclose(e, target, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every", [1, 3, 10])
@pytest.mark.parametrize("jit", [True, False])
def test_hard_target_copy_every_n_updates(every, jit):
  # DQN: the target is the params at init, then a copy of the params after
  # updates N, 2N, ..., held in between: bit for bit.
  p0, grads = trajectory(32, seed=6)
  ps, es, _ = run(ema_jax.ema(0.0, update_every=every), p0, grads, jit=jit)
  for n in range(1, len(ps) + 1):
    last = n - n % every  # the last multiple of N
    want = ps[last - 1] if last else np.asarray(p0, np.float64)
    assert_bitwise_equal(es[n - 1], want)


@pytest.mark.parametrize("alpha, every", [(0.6, 4), (0.05, 10)])
def test_reference_model_mixed_every_n_updates(alpha, every):
  # RLHF's reference model: ref <- alpha * policy + (1 - alpha) * ref after
  # updates N, 2N, ...; unchanged in between.
  p0, grads = trajectory(3 * every, seed=11)
  tx = ema_jax.ema(ema_jax.scale_decay(1 - alpha, 1 / every), update_every=every)
  ps, es, _ = run(tx, p0, grads)
  ref = np.asarray(p0, np.float64)
  for n in range(1, len(ps) + 1):
    if n % every == 0:
      ref = alpha * ps[n - 1] + (1 - alpha) * ref
    np.testing.assert_allclose(es[n - 1], ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# The teacher inside the loss.
# ---------------------------------------------------------------------------


def _teacher_setup():
  rng = np.random.default_rng(7)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))
  state = tx.init(params)
  for i in range(3):  # a teacher that differs from the student
    g = jax.tree.map(lambda p: jnp.full_like(p, 0.3 * (i + 1)), params)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state, x


def _apply(p, x):
  return jnp.tanh(x @ p["w"] + p["b"])


def test_gradient_flows_through_the_student_only():
  params, state, x = _teacher_setup()

  @jax.jit
  def loss(p, opt_state):  # Mean Teacher / BYOL: the teacher read in the loss
    teacher = _apply(ema_jax.ema_params(opt_state), x)
    return jnp.mean((_apply(p, x) - teacher) ** 2)

  frozen = jax.tree.map(np.asarray, ema_jax.ema_params(state))  # a constant

  def loss_constant(p):
    return jnp.mean((_apply(p, x) - _apply(frozen, x)) ** 2)

  def loss_stopped(p, opt_state):
    teacher = jax.lax.stop_gradient(_apply(ema_jax.ema_params(opt_state), x))
    return jnp.mean((_apply(p, x) - teacher) ** 2)

  g = jax.grad(loss)(params, state)
  for other in (jax.grad(loss_constant)(params),
                jax.grad(loss_stopped)(params, state)):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(other)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert all(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(g))
  # A loss of the teacher alone has no gradient in the params.
  zero = jax.grad(lambda p, s: jnp.sum(_apply(ema_jax.ema_params(s), x)))(
      params, state)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(zero))


# ---------------------------------------------------------------------------
# blend
# ---------------------------------------------------------------------------


def _trained(tx, params, steps=3, seed=8):
  chain = optax.chain(optax.sgd(0.5), tx)
  state = chain.init(params)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    grads = jax.tree.map(
        lambda p: (jnp.asarray(rng.normal(size=jnp.shape(p)), p.dtype)
                   if jnp.issubdtype(p.dtype, jnp.floating)
                   else jnp.zeros_like(p)),
        params,
    )
    updates, state = chain.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _mixed_params():
  rng = np.random.default_rng(9)
  return {
      "bf16": jnp.asarray(rng.normal(size=(5, 4)), jnp.bfloat16),
      "f32": jnp.asarray(rng.normal(size=(6,)), jnp.float32),
      "frozen": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
      "step": jnp.int32(4),
  }


MASK = {"bf16": True, "f32": True, "frozen": False, "step": True}


@pytest.mark.standard_promotion  # optax.apply_updates on an int32 leaf
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.999, 1.0])
def test_blend_values_dtypes_and_untouched_leaves(alpha):
  params, state = _trained(ema_jax.ema(0.8, mask=MASK), _mixed_params())
  ema = ema_jax.ema_params(state)
  assert ema["bf16"].dtype == jnp.float32  # a float32 EMA of bfloat16 params
  with jax.numpy_dtype_promotion("strict"):
    out = ema_jax.blend(params, state, alpha)
    jitted = jax.jit(ema_jax.blend, static_argnames="alpha")(params, state, alpha)
  if alpha in (0.0, 1.0):  # in between, XLA may fuse the arithmetic
    assert_bitwise_equal(out, jitted)
  for name in ("frozen", "step"):  # masked and carried: the params' own
    assert_bitwise_equal(out[name], params[name])
  for name in ("bf16", "f32"):
    p, e = params[name], ema[name]
    assert out[name].dtype == p.dtype
    if alpha == 0.0:
      assert_bitwise_equal(out[name], p)
    elif alpha == 1.0:
      assert_bitwise_equal(out[name], e.astype(p.dtype))
    else:
      want = alpha * np.asarray(e, np.float64) + (1 - alpha) * np.asarray(
          p.astype(jnp.float32), np.float64)
      for got in (out[name], jitted[name]):
        np.testing.assert_allclose(
            np.asarray(got.astype(jnp.float32)), want,
            rtol=2**-8 if p.dtype == jnp.bfloat16 else 1e-6, atol=1e-6)


def test_blend_at_zero_is_the_params_even_with_a_non_finite_ema():
  params = jnp.array([1.0, 2.0])
  state = ema_jax.reset(ema_jax.ema(0.9).init(params), jnp.array([jnp.inf, jnp.nan]))
  assert_bitwise_equal(ema_jax.blend(params, state, 0.0), params)


def test_blend_picks_an_average_of_multi_ema():
  params, state = _trained(ema_jax.multi_ema([0.5, 0.99]), jnp.zeros(4))
  for i in (0, 1):
    e = ema_jax.ema_params(state, index=i)
    assert_bitwise_equal(ema_jax.blend(params, state, 1.0, index=i), e)
  with pytest.raises(ValueError, match="pass `index=i`"):
    ema_jax.blend(params, state, 1.0)
  with pytest.raises(ValueError, match="out of range"):
    ema_jax.blend(params, state, 1.0, index=2)


def test_switch_ema_write_back_every_n_steps():
  # Switch EMA: params <- EMA every N steps inside the jitted step, by a cond.
  N = 3
  tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    count = optax.tree_utils.tree_get(state, "count")
    params = jax.lax.cond(count % N == 0,
                          lambda p: ema_jax.blend(p, state, 1.0),
                          lambda p: p, params)
    return params, state

  params = jnp.array([1.0, -1.0])
  state = tx.init(params)
  for n in range(1, 8):
    params, state = step(params, state, jnp.array([1.0, 2.0]) * n)
    if n % N == 0:
      assert_bitwise_equal(params, ema_jax.ema_params(state))
    else:
      assert not np.array_equal(params, ema_jax.ema_params(state))


@pytest.mark.parametrize("alpha, error, pattern", [
    (-0.1, ValueError, r"`alpha` must be in \[0, 1\].*weight of the EMA"),
    (1.5, ValueError, r"`alpha`"),
    (float("nan"), ValueError, r"`alpha`"),
    ("0.5", TypeError, r"`alpha`"),
    (True, TypeError, r"`alpha`"),
    (None, TypeError, r"`alpha`"),
    (jnp.ones(2), TypeError, r"`alpha`"),
])
def test_blend_refuses_bad_alpha(alpha, error, pattern):
  params = jnp.ones(2)
  state = ema_jax.ema(0.9).init(params)
  with pytest.raises(error, match=pattern):
    ema_jax.blend(params, state, alpha)


def test_blend_refuses_a_swapped_state():
  params = jnp.ones(2)
  ema_weights, swapped = ema_jax.swap(params, ema_jax.ema(0.9).init(params))
  with pytest.raises(ValueError, match="`blend` got a swapped EMA state"):
    ema_jax.blend(ema_weights, swapped, 0.5)


# ---------------------------------------------------------------------------
# reset
# ---------------------------------------------------------------------------


@pytest.mark.standard_promotion  # optax.apply_updates on an int32 leaf
def test_reset_copies_the_params_and_keeps_the_rest():
  tx = ema_jax.ema(0.8, mask=MASK, debias=True)
  params, state = _trained(optax.chain(optax.adam(0.1), tx), _mixed_params())
  other = jax.tree.map(lambda p: p + jnp.ones((), p.dtype), params)
  with jax.numpy_dtype_promotion("strict"):
    new = ema_jax.reset(state, other)
  ema = ema_jax.ema_params(new)
  assert_bitwise_equal(ema["bf16"], other["bf16"].astype(jnp.float32))
  assert_bitwise_equal(ema["f32"], other["f32"])
  assert_bitwise_equal(ema["step"], other["step"])
  assert ema["frozen"] is None
  old_ema_state = state[1][1]
  new_ema_state = new[1][1]
  assert_bitwise_equal(new_ema_state.count, old_ema_state.count)
  # Restarted with its full weight: the next update moves it, never copies.
  assert_bitwise_equal(
      new_ema_state.debias_norm, jnp.ones_like(old_ema_state.debias_norm))
  assert_bitwise_equal(new[0], state[0])  # sgd and adam's states
  assert_bitwise_equal(new[1][0], state[1][0])
  # The average is a fresh copy, not the params' own buffers.
  assert ema["f32"] is not other["f32"]


def test_reset_then_averaging_goes_on_from_the_params():
  p0, grads = trajectory(4, seed=10)
  tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.75))
  state = tx.init(p0)
  restart = jnp.full(SHAPE, 3.0)
  state = ema_jax.reset(state, restart)
  updates, state = tx.update(grads[0], state, p0)
  p1 = np.asarray(optax.apply_updates(p0, updates), np.float64)
  np.testing.assert_allclose(ema_jax.ema_params(state),
                             0.75 * 3.0 + 0.25 * p1, rtol=1e-6)


def test_reset_sets_every_average_of_multi_ema():
  params, state = _trained(ema_jax.multi_ema([0.5, 0.9, 0.99]), jnp.zeros(4))
  new = ema_jax.reset(state, jnp.arange(4.0))
  for i in range(3):
    assert_bitwise_equal(ema_jax.ema_params(new, index=i), jnp.arange(4.0))
  assert new[1].ema.shape == (3, 4)


def test_reset_picks_one_of_several_ema_states():
  params = jnp.zeros(2)
  tx = optax.chain(ema_jax.ema(0.5), ema_jax.ema(0.9))
  state = tx.init(params)
  with pytest.raises(ValueError, match="pass `which=i`"):
    ema_jax.reset(state, jnp.ones(2))
  new = ema_jax.reset(state, jnp.ones(2), which=1)
  assert_bitwise_equal(ema_jax.ema_params(new, which=0), jnp.zeros(2))
  assert_bitwise_equal(ema_jax.ema_params(new, which=1), jnp.ones(2))


@pytest.mark.parametrize("other, pattern", [
    ({"w": jnp.ones(3)}, r"structure.*\['b'\]"),
    ({"w": jnp.ones(4), "b": jnp.ones(2), "n": jnp.int32(0)}, r"Leaf \['w'\].*shape"),
    ({"w": jnp.ones(3, jnp.int32), "b": jnp.ones(2), "n": jnp.int32(0)},
     r"Leaf \['w'\].*dtype int32"),
    ({"w": jnp.ones(3), "b": jnp.ones(2), "n": jnp.float32(0)},
     r"Leaf \['n'\].*dtype float32"),
    ({"w": jnp.ones(3), "b": jnp.ones(2, jnp.complex64), "n": jnp.int32(0)},
     r"Leaf \['b'\].*complex64"),
])
def test_reset_and_blend_refuse_other_params(other, pattern):
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2), "n": jnp.int32(0)}
  state = ema_jax.ema(0.9).init(params)
  with pytest.raises(ValueError, match=pattern):
    ema_jax.reset(state, other)
  with pytest.raises(ValueError, match=pattern):
    ema_jax.blend(other, state, 0.5)


def test_reset_refuses_a_swapped_state():
  params = jnp.ones(2)
  _, swapped = ema_jax.swap(params, ema_jax.ema(0.9).init(params))
  with pytest.raises(ValueError, match="`reset` got a swapped EMA state"):
    ema_jax.reset(swapped, params)


def test_reset_under_jit_matches_eager():
  params, state = _trained(ema_jax.multi_ema([0.5, 0.9]), jnp.zeros((2, 3)))
  other = jnp.arange(6.0).reshape(2, 3)
  assert_bitwise_equal(jax.jit(ema_jax.reset)(state, other),
                       ema_jax.reset(state, other))


# ---------------------------------------------------------------------------
# Placement: sharding and memory kind kept.
# ---------------------------------------------------------------------------


@pytest.mark.standard_promotion  # optax.apply_updates on an int32 leaf
@pytest.mark.parametrize(
    "memory_kind", [None, pytest.param(HOST, marks=needs_memory_spaces)])
@pytest.mark.parametrize("multi", [False, True])
def test_reset_and_blend_keep_sharding_and_memory_kind(memory_kind, multi):
  mesh = make_mesh()
  params = make_params(mesh)
  tx = (ema_jax.multi_ema([0.5, 0.9], memory_kind=memory_kind) if multi
        else ema_jax.ema(0.5, memory_kind=memory_kind))
  params, state = _trained(tx, params, steps=2)
  index = 1 if multi else None
  before = state[1].ema
  other = jax.tree.map(lambda p: p * jnp.asarray(2, p.dtype), params)
  with jax.numpy_dtype_promotion("strict"):
    for reset in (ema_jax.reset, jax.jit(ema_jax.reset)):
      after = reset(state, other)[1].ema
      for name in params:
        # Equivalent: jax 0.5.3 writes a jitted output's spec as ('model',)
        # where the input's was ('model', None).
        assert after[name].sharding.memory_kind == before[name].sharding.memory_kind, name
        assert after[name].sharding.is_equivalent_to(
            before[name].sharding, before[name].ndim), name
    for blend in (ema_jax.blend,
                  jax.jit(ema_jax.blend, static_argnames=("alpha", "index"))):
      out = blend(params, state, 0.5, index=index)
      for name, p in params.items():
        assert isinstance(out[name].sharding, NamedSharding), name
        assert out[name].sharding.memory_kind == p.sharding.memory_kind, name
        assert out[name].sharding.is_equivalent_to(p.sharding, p.ndim), name
      want = 0.5 * np.asarray(ema_jax.ema_params(state, index=index)["w1"],
                              np.float64) + 0.5 * np.asarray(params["w1"], np.float64)
      np.testing.assert_allclose(out["w1"], want, rtol=1e-6, atol=1e-7)
