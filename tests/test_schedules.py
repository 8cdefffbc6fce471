"""The public decay schedules against their formulas, in NumPy float64."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax
from ema_jax import _compat

STEPS = np.concatenate([np.arange(0, 200), [499, 1000, 31_622, 10**5, 10**6,
                                             2**31 - 1]]).astype(np.int64)


def np_power(gamma):
  t = STEPS.astype(np.float64) + 1.0
  return (1.0 - 1.0 / t) ** (gamma + 1.0)


CASES = {
    "constant": (ema_jax.constant_decay(0.993),
                 lambda: np.full(STEPS.shape, 0.993)),
    "constant_0": (ema_jax.constant_decay(0.0), lambda: np.zeros(STEPS.shape)),
    "constant_1": (ema_jax.constant_decay(1.0), lambda: np.ones(STEPS.shape)),
    "tf_dynamic": (
        ema_jax.tf_dynamic_decay(0.99),
        lambda: np.minimum(0.99, (1.0 + STEPS) / (10.0 + STEPS)),
    ),
    "warmup_default": (
        ema_jax.warmup_decay(0.9999),
        lambda: np.clip(1 - (1 + STEPS / 1.0) ** (-2 / 3), 0.0, 0.9999),
    ),
    "warmup_custom": (
        ema_jax.warmup_decay(0.995, inv_gamma=7.0, power=0.75, min_decay=0.3),
        lambda: np.maximum(
            np.minimum(1 - (1 + STEPS / 7.0) ** -0.75, 0.995), 0.3),
    ),
    "power_gamma": (ema_jax.power_decay(gamma=6.94), lambda: np_power(6.94)),
    "power_negative_gamma": (ema_jax.power_decay(gamma=-0.5),
                             lambda: np_power(-0.5)),
    "power_sigma_rel": (
        ema_jax.power_decay(sigma_rel=0.05),
        # gamma for sigma_rel 0.05, solved independently below.
        lambda: np_power(_solve_gamma(0.05)),
    ),
    "half_life": (ema_jax.half_life_decay(100.0),
                  lambda: np.full(STEPS.shape, 0.5 ** (1 / 100.0))),
    "half_life_samples": (
        ema_jax.half_life_decay(20_000.0, batch_size=256),
        lambda: np.full(STEPS.shape, 0.5 ** (256 / 20_000.0)),
    ),
    "half_life_edm_rampup": (  # EDM: h = min(H, cur_nimg r), cur_nimg = k B
        ema_jax.half_life_decay(500_000.0, batch_size=512, rampup_ratio=0.05),
        lambda: 0.5 ** (512 / np.maximum(
            np.minimum(500_000.0, STEPS * 512.0 * 0.05), 1e-8)),
    ),
    "cosine_byol": (  # BYOL: 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
        ema_jax.cosine_decay(0.996, steps=1000),
        lambda: 1 - (1 - 0.996) * (np.cos(np.pi * np.minimum(STEPS, 1000)
                                          / 1000) + 1) / 2,
    ),
    "cosine_end": (
        ema_jax.cosine_decay(0.5, 0.99, steps=150),
        lambda: 0.99 - (0.99 - 0.5) * (np.cos(np.pi * np.minimum(STEPS, 150)
                                              / 150) + 1) / 2,
    ),
    "uniform": (ema_jax.uniform_decay(), lambda: STEPS / (STEPS + 1.0)),
    "scale_constant": (ema_jax.scale_decay(0.999, 4),
                       lambda: np.full(STEPS.shape, 0.999**4)),
    "scale_power": (ema_jax.scale_decay(ema_jax.power_decay(gamma=6.94), 0.5),
                    lambda: np_power(6.94) ** 0.5),
}


def _solve_gamma(sigma_rel: float) -> float:
  """gamma from sigma_rel by bisection on the closed form of sigma_rel(gamma)."""

  def sigma(g):
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))

  # sigma decreases with gamma on [0, inf), from 1/sqrt(12) at gamma = 0 (it
  # rises again on (-1, 0), where the largest root of the cubic is not it).
  lo, hi = 0.0, 1e6
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if sigma(mid) > sigma_rel:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_values(name):
  schedule, expected = CASES[name]
  want = expected()
  counts = jnp.asarray(STEPS, jnp.int32)
  eager = np.array([float(schedule(jnp.asarray(c, jnp.int32)))
                    for c in STEPS[:20]])
  np.testing.assert_allclose(eager, want[:20], rtol=2e-6, atol=1e-7)
  # Traced count under jit, several counts through vmap: no recompiles, and
  # the same numbers everywhere.
  traces = []

  @jax.jit
  def at(count):
    traces.append(1)
    return schedule(count)

  jitted = np.array([float(at(jnp.asarray(c, jnp.int32))) for c in STEPS])
  assert len(traces) == 1
  np.testing.assert_allclose(jitted, want, rtol=2e-6, atol=1e-7)
  vmapped = np.asarray(jax.jit(jax.vmap(schedule))(counts))
  np.testing.assert_allclose(vmapped, want, rtol=2e-6, atol=1e-7)
  assert np.shape(schedule(jnp.asarray(3, jnp.int32))) == ()
  assert np.all((vmapped >= 0) & (vmapped <= 1))


def test_schedules_in_float64():
  with _compat.enable_x64(True):
    for name in ("tf_dynamic", "warmup_custom", "power_gamma",
                 "half_life_edm_rampup", "cosine_byol", "uniform",
                 "scale_power"):
      schedule, expected = CASES[name]
      got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(STEPS)))
      assert got.dtype == np.float64
      np.testing.assert_allclose(got, expected(), rtol=1e-13, atol=1e-15,
                                 err_msg=name)


def test_known_values():
  # The doc'd landmarks: TF's ramp, timm's warm-up reaching 0.999 near 31k
  # steps, a half-life halving a weight, EDM2's profile.
  assert float(ema_jax.tf_dynamic_decay(0.99)(0)) == pytest.approx(0.1)
  assert float(ema_jax.tf_dynamic_decay(0.99)(10)) == pytest.approx(11 / 20)
  assert float(ema_jax.warmup_decay(0.9999)(31_622)) == pytest.approx(
      0.999, abs=2e-6)
  d = float(ema_jax.half_life_decay(25.0)(0))
  assert d**25 == pytest.approx(0.5, rel=1e-5)
  assert float(ema_jax.power_decay(gamma=7.0)(0)) == 0.0
  assert float(ema_jax.power_decay(gamma=7.0)(1)) == pytest.approx(0.5**8)
  assert float(ema_jax.warmup_decay(0.9)(0)) == 0.0


def test_power_decay_product_is_edm2_update_every():
  # EDM2 with update_every=k uses (1 - k/t)**(gamma+1) at t = multiples of k;
  # the product of the per-step profile over t-k+1..t telescopes to it.
  gamma, k = 6.94, 8
  schedule = ema_jax.power_decay(gamma=gamma)
  for t in (8, 16, 80, 800):
    product = np.prod([float(schedule(s - 1)) for s in range(t - k + 1, t + 1)])
    assert product == pytest.approx((1 - k / t) ** (gamma + 1), rel=1e-5,
                                    abs=1e-12)


@pytest.mark.parametrize(
    "sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94), (0.28, 0.169)]
)
def test_sigma_rel_to_gamma_reference_values(sigma_rel, gamma):
  got = ema_jax.sigma_rel_to_gamma(sigma_rel)
  assert got == pytest.approx(gamma, abs=5e-3)
  assert got == pytest.approx(_solve_gamma(sigma_rel), rel=1e-9)
  # The cubic of EDM2's Eq. 3 is satisfied.
  t = sigma_rel**-2
  assert got**3 + 7 * got**2 + (16 - t) * got + (12 - t) == pytest.approx(
      0.0, abs=1e-8 * t * max(1.0, got) ** 3)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28, 0.288])
def test_sigma_rel_gamma_roundtrip(sigma_rel):
  gamma = ema_jax.sigma_rel_to_gamma(sigma_rel)
  assert ema_jax.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)


@pytest.mark.parametrize("gamma", [-0.9, -0.5, 0.001, 0.169, 1.0, 6.94,
                                   16.97, 100.0])
def test_gamma_sigma_rel_roundtrip(gamma):
  sigma_rel = ema_jax.gamma_to_sigma_rel(gamma)
  assert sigma_rel == pytest.approx(
      math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))), rel=1e-12)
  if gamma > 0:
    assert ema_jax.sigma_rel_to_gamma(sigma_rel) == pytest.approx(
        gamma, rel=1e-7, abs=1e-7)
  else:
    # For gamma in (-1, 0] sigma_rel is >= 1/sqrt(12), or equals that of a
    # positive gamma: not invertible, and sigma_rel_to_gamma says so or gives
    # the positive gamma of the same width.
    if sigma_rel >= 12**-0.5:
      with pytest.raises(ValueError, match=r"`sigma_rel`"):
        ema_jax.sigma_rel_to_gamma(sigma_rel)
    else:
      other = ema_jax.sigma_rel_to_gamma(sigma_rel)
      assert other > 0
      assert ema_jax.gamma_to_sigma_rel(other) == pytest.approx(sigma_rel)


def test_power_decay_from_sigma_rel_equals_from_gamma():
  counts = jnp.arange(1000)
  a = ema_jax.power_decay(sigma_rel=0.1)(counts)
  b = ema_jax.power_decay(gamma=ema_jax.sigma_rel_to_gamma(0.1))(counts)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda: ema_jax.constant_decay(1.01), ValueError, r"`decay`.*\[0, 1\]"),
        (lambda: ema_jax.constant_decay(-0.5), ValueError, r"`decay`"),
        (lambda: ema_jax.constant_decay(None), TypeError, r"`decay`"),
        (lambda: ema_jax.tf_dynamic_decay(2.0), ValueError, r"`decay`"),
        (lambda: ema_jax.warmup_decay(1.5), ValueError, r"`decay`"),
        (lambda: ema_jax.warmup_decay(0.99, min_decay=-0.1), ValueError,
         r"`min_decay`"),
        (lambda: ema_jax.warmup_decay(0.9, min_decay=0.95), ValueError,
         r"`min_decay`.*must not exceed `decay`"),
        (lambda: ema_jax.warmup_decay(0.99, inv_gamma=0.0), ValueError,
         r"`inv_gamma`"),
        (lambda: ema_jax.warmup_decay(0.99, inv_gamma=math.inf), ValueError,
         r"`inv_gamma`"),
        (lambda: ema_jax.warmup_decay(0.99, power=-1.0), ValueError,
         r"`power`"),
        (lambda: ema_jax.power_decay(), ValueError, r"exactly one"),
        (lambda: ema_jax.power_decay(gamma=7.0, sigma_rel=0.1), ValueError,
         r"exactly one"),
        (lambda: ema_jax.power_decay(gamma=-1.0), ValueError, r"`gamma`"),
        (lambda: ema_jax.power_decay(sigma_rel=0.3), ValueError,
         r"`sigma_rel`"),
        (lambda: ema_jax.sigma_rel_to_gamma(0.0), ValueError, r"`sigma_rel`"),
        (lambda: ema_jax.sigma_rel_to_gamma(12**-0.5), ValueError,
         r"`sigma_rel`"),
        (lambda: ema_jax.gamma_to_sigma_rel(-1.5), ValueError, r"`gamma`"),
        (lambda: ema_jax.half_life_decay(0.0), ValueError, r"`half_life`"),
        (lambda: ema_jax.half_life_decay(-3.0), ValueError, r"`half_life`"),
        (lambda: ema_jax.half_life_decay(math.nan), ValueError,
         r"`half_life`"),
        (lambda: ema_jax.half_life_decay(10.0, batch_size=0), ValueError,
         r"`batch_size`"),
        (lambda: ema_jax.half_life_decay(10.0, batch_size="64"), TypeError,
         r"`batch_size`"),
        (lambda: ema_jax.half_life_decay(10.0, rampup_ratio=-0.05),
         ValueError, r"`rampup_ratio`"),
        (lambda: ema_jax.half_life_decay(10.0, rampup_ratio=math.inf),
         ValueError, r"`rampup_ratio`"),
        (lambda: ema_jax.cosine_decay(0.996, steps=0), ValueError, r"`steps`"),
        (lambda: ema_jax.cosine_decay(0.996, steps=10.5), TypeError,
         r"`steps`"),
        (lambda: ema_jax.cosine_decay(1.2, steps=10), ValueError, r"`start`"),
        (lambda: ema_jax.cosine_decay(0.9, -1.0, steps=10), ValueError,
         r"`end`"),
        (lambda: ema_jax.cosine_decay("0.9", steps=10), TypeError, r"`start`"),
        (lambda: ema_jax.scale_decay(0.99, 0), ValueError, r"`factor`"),
        (lambda: ema_jax.scale_decay(0.99, -2.0), ValueError, r"`factor`"),
        (lambda: ema_jax.scale_decay(0.99, None), TypeError, r"`factor`"),
        (lambda: ema_jax.scale_decay(1.5, 2.0), ValueError, r"`decay`"),
        (lambda: ema_jax.scale_decay(lambda k: jnp.full((), 2.0), 2.0),
         ValueError, r"`decay` schedule returns 2.0"),
    ],
)
def test_validation_errors(make, error, pattern):
  with pytest.raises(error, match=pattern):
    make()


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedules_are_accepted_by_ema(name):
  # Each public schedule passes ema()'s build-time probe, and the first
  # averaged update uses the schedule's value at count 0.
  schedule, expected = CASES[name]
  tx = ema_jax.ema(schedule)
  state = tx.init(jnp.zeros(()))
  _, state = tx.update(jnp.zeros(()), state, jnp.ones(()))
  assert float(state.ema) == pytest.approx(1.0 - expected()[0], abs=1e-6)


def test_power_decay_does_not_freeze_in_float32_past_2_to_the_24():
  gamma = 6.94
  schedule = ema_jax.power_decay(gamma=gamma)
  for t in (2**20, 2**25, 3 * 10**7):
    one_minus = 1.0 - float(schedule(jnp.int32(t - 1)))
    exact = -np.expm1((gamma + 1) * np.log1p(-1.0 / t))
    assert one_minus > 0  # `1 - 1/t` rounded to 1 froze the average here
    # float32 resolves 1 - decay to ~6e-8 absolute near 1.
    assert abs(one_minus - exact) <= 1.2e-7, (t, one_minus, exact)
