"""Decay schedules: callables of the step count that return the EMA decay.

Every schedule here follows optax's convention: it is a function of `count`, an
integer array (traced under jit), and returns a scalar array. For the EMA,
`count` is the number of optimizer updates since averaging started, so it is 0
at the first averaged update. A decay of 0 copies the parameters; a decay of 1
freezes the average.

The schedules built here are `DecaySchedule`s: besides the decay they give its
complement `1 - decay`, the weight of the new value, computed without
cancellation. That weight is what the average uses, so a decay of 0.9999999 or
a power profile at step 1e8 averages with the right weight in float32. A plain
callable works too; its weight is then `1 - decay`, as exact as the decay is.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _checks

Schedule = Callable[[jax.Array], jax.Array]
Decay = Union[float, Schedule]


class DecaySchedule:
  """A decay schedule that also gives `1 - decay` without cancellation.

  Calling it returns the decay at a step count, as any optax-style schedule;
  `weight(count)` returns `1 - decay`, computed directly (for a constant decay
  in float64 from the Python float; for power profiles as
  `-expm1((gamma + 1) * log1p(-1 / t))`), so a weight of 1e-7 is not rounded
  to the 1.19e-7 that `1 - float32(0.9999999)` gives. Every schedule of
  ema_jax returns one; `ema()` and `multi_ema()` average with its weight.

  Args:
    decay: `count -> decay`.
    weight: `count -> 1 - decay`, computed without cancellation.
    name: shown by `repr`.
    constant: whether the decay is the same at every count.
    power_gamma: the exponent of a power-function profile (`power_decay`),
      else `None`; a `multi_ema` of these records its profile in its state.

  Examples:
    >>> import ema_jax
    >>> schedule = ema_jax.constant_decay(0.9999999)
    >>> float(schedule.weight(0))  # 1 - float32(0.9999999) would be 1.19e-07
    1e-07
  """

  def __init__(
      self, decay: Schedule, weight: Schedule, name: str, *,
      constant: bool = False, power_gamma: float | None = None,
  ):
    self._decay = decay
    self._weight = weight
    self._name = name
    # The same decay at every count: the engine may fold it into the update.
    self.constant = constant
    self.power_gamma = power_gamma

  def __call__(self, count: Any) -> jax.Array:
    return self._decay(count)

  def weight(self, count: Any) -> jax.Array:
    """`1 - decay` at `count`, without cancellation.

    Examples:
      >>> import ema_jax
      >>> round(float(ema_jax.power_decay(gamma=7.0).weight(999)), 6)
      0.007972
    """
    return self._weight(count)

  def __repr__(self) -> str:
    return self._name


def weight_fn(schedule: Schedule) -> Schedule:
  """`count -> 1 - decay` for any schedule: exact for a `DecaySchedule`."""
  if isinstance(schedule, DecaySchedule):
    return schedule.weight
  return lambda count: 1.0 - jnp.asarray(schedule(count))


def as_schedule(value: Any, name: str = "decay") -> Schedule:
  """A checked schedule from a float or a callable of the step count."""
  checked = _checks.decay(name, value)
  if isinstance(checked, float):
    return constant_decay(checked)
  if _checks.is_traced(checked):
    return _traced_constant(checked)
  return checked


def _traced_constant(decay: jax.Array) -> DecaySchedule:
  """A decay known only when the step runs (injected, vmapped, computed).

  Its weight is `1 - decay` in the decay's dtype (float32 unless x64 is on),
  clipped into [0, 1] by the engine like every weight.
  """
  weight = 1 - decay
  return DecaySchedule(
      lambda count: jnp.full_like(_float(count), decay),
      lambda count: jnp.full_like(_float(count), weight),
      "constant_decay(<traced>)",
      constant=True,
  )


def _float(count: Any) -> jax.Array:
  return jnp.asarray(count).astype(jnp.result_type(float))


def _constant(value: float, count: Any) -> jax.Array:
  return jnp.full_like(_float(count), value)


def constant_decay(decay: float) -> DecaySchedule:
  """The same decay at every step.

  Args:
    decay: the weight of the old average, in [0, 1].

  Returns:
    A schedule `count -> decay`.

  Examples:
    >>> import ema_jax
    >>> schedule = ema_jax.constant_decay(0.99)
    >>> float(schedule(0)), float(schedule(1000))
    (0.99, 0.99)
  """
  decay = _checks.unit_float("decay", decay)
  weight = 1.0 - decay  # in float64: exact for decays near 1
  return DecaySchedule(
      lambda count: _constant(decay, count),
      lambda count: _constant(weight, count),
      f"constant_decay({decay!r})",
      constant=True,
  )


def tf_dynamic_decay(decay: float) -> DecaySchedule:
  """TensorFlow's ramp `min(decay, (1 + count) / (10 + count))`.

  This is `tf.train.ExponentialMovingAverage(num_updates=...)` and TensorFlow
  Addons' `MovingAverage(dynamic_decay=True)`: the average warms up quickly at
  the start of training and reaches `decay` after about `9 / (1 - decay)` steps.

  Args:
    decay: the largest decay, in [0, 1].

  Returns:
    A schedule `count -> decay`.

  Examples:
    >>> import ema_jax
    >>> schedule = ema_jax.tf_dynamic_decay(0.99)
    >>> [round(float(schedule(k)), 4) for k in (0, 1, 10, 10_000)]
    [0.1, 0.1818, 0.55, 0.99]
  """
  decay = _checks.unit_float("decay", decay)
  weight = 1.0 - decay

  def schedule(count: jax.Array) -> jax.Array:
    k = _float(count)
    return jnp.minimum(decay, (1.0 + k) / (10.0 + k))

  def complement(count: jax.Array) -> jax.Array:
    k = _float(count)
    return jnp.maximum(weight, 9.0 / (10.0 + k))

  return DecaySchedule(schedule, complement, f"tf_dynamic_decay({decay!r})")


def warmup_decay(
    decay: float,
    *,
    inv_gamma: float = 1.0,
    power: float = 2.0 / 3.0,
    min_decay: float = 0.0,
) -> DecaySchedule:
  """The timm/diffusers warm-up `1 - (1 + count / inv_gamma) ** -power`.

  The value is clipped to `[min_decay, decay]`. It is 0 at `count=0`, so the
  first averaged update copies the parameters. `power=2/3` reaches 0.999 at
  about 31k steps and 0.9999 at 1M steps; `power=3/4` suits shorter runs.

  Args:
    decay: the largest decay, in [0, 1].
    inv_gamma: the step scale of the warm-up, positive.
    power: the exponent of the warm-up, positive.
    min_decay: the smallest decay, in [0, decay].

  Returns:
    A schedule `count -> decay`.

  Examples:
    >>> import ema_jax
    >>> schedule = ema_jax.warmup_decay(0.9999)
    >>> [round(float(schedule(k)), 4) for k in (0, 1, 100, 1_000_000)]
    [0.0, 0.37, 0.9539, 0.9999]
  """
  decay = _checks.unit_float("decay", decay)
  min_decay = _checks.unit_float("min_decay", min_decay)
  if min_decay > decay:
    raise ValueError(
        f"`min_decay` ({min_decay}) must not exceed `decay` ({decay})."
    )
  inv_gamma = _checks.positive_float("inv_gamma", inv_gamma)
  power = _checks.positive_float("power", power)

  def schedule(count: jax.Array) -> jax.Array:
    k = _float(count)
    value = 1.0 - (1.0 + k / inv_gamma) ** -power
    # diffusers' order: cap at `decay` first, then floor at `min_decay`.
    return jnp.maximum(jnp.minimum(value, decay), min_decay)

  def complement(count: jax.Array) -> jax.Array:
    k = _float(count)
    value = (1.0 + k / inv_gamma) ** -power
    return jnp.minimum(jnp.maximum(value, 1.0 - decay), 1.0 - min_decay)

  return DecaySchedule(
      schedule,
      complement,
      f"warmup_decay({decay!r}, inv_gamma={inv_gamma!r}, power={power!r}, "
      f"min_decay={min_decay!r})",
  )


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The exponent `gamma` of the power-function EMA of relative width `sigma_rel`.

  Solves `gamma**3 + 7 gamma**2 + (16 - s**-2) gamma + (12 - s**-2) = 0` for its
  largest real root (Karras et al., EDM2, Eq. 3 inverted; `std_to_exp` in the
  EDM2 code).

  Args:
    sigma_rel: the relative standard deviation of the averaging profile, in
      (0, 1/sqrt(12)) (the upper bound is a uniform average over all steps).

  Returns:
    gamma, a float > -1.

  Examples:
    >>> import ema_jax
    >>> round(ema_jax.sigma_rel_to_gamma(0.05), 3), round(ema_jax.sigma_rel_to_gamma(0.10), 3)
    (16.972, 6.937)
  """
  sigma_rel = float(sigma_rel)
  if not 0.0 < sigma_rel < 12.0**-0.5:
    raise ValueError(
        f"`sigma_rel` must be in (0, {12.0**-0.5:.4f}), got {sigma_rel}; the "
        "upper bound is a plain average of all steps."
    )
  t = sigma_rel**-2
  roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
  return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
  """The relative width `sigma_rel` of the power-function EMA of exponent `gamma`.

  Args:
    gamma: the exponent, > -1.

  Returns:
    `sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))`.

  Examples:
    >>> import ema_jax
    >>> round(ema_jax.gamma_to_sigma_rel(6.94), 4)
    0.1
  """
  gamma = float(gamma)
  if not gamma > -1.0:
    raise ValueError(f"`gamma` must be > -1, got {gamma}.")
  return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def power_decay(
    *, gamma: float | None = None, sigma_rel: float | None = None
) -> DecaySchedule:
  """The EDM2 power-function profile `(1 - 1 / t) ** (gamma + 1)`, `t = count + 1`.

  The average at step `t` weighs step `tau` in proportion to `tau ** gamma`, so
  its length grows with training and is the same fraction of it at every
  point. Give exactly one of `gamma` and `sigma_rel`. With
  `ema(..., update_every=k)` the decays of the `k` steps are multiplied, which
  is EDM2's `(1 - k / t) ** (gamma + 1)`: the profile does not shift with `k`.

  Args:
    gamma: the exponent, > -1 (EDM2 uses 6.94 and 16.97).
    sigma_rel: the relative width, e.g. 0.05 or 0.10; see `sigma_rel_to_gamma`.

  Precision: the average uses the weight `1 - decay`, computed as
  `-expm1((gamma + 1) * log1p(-1 / t))`, which is exact to float32 precision
  at every int32 step (a float32 decay itself would carry `1 - decay` with a
  relative error of about `6e-8 / (1 - decay)`: 16% at t = 2e7).

  Returns:
    A schedule `count -> decay`, 0 at `count=0`.

  Examples:
    >>> import ema_jax
    >>> schedule = ema_jax.power_decay(gamma=7.0)
    >>> [round(float(schedule(k)), 4) for k in (0, 1, 999)]
    [0.0, 0.0039, 0.992]
  """
  if (gamma is None) == (sigma_rel is None):
    raise ValueError("Give exactly one of `gamma` and `sigma_rel`.")
  if gamma is None:
    assert sigma_rel is not None
    gamma = sigma_rel_to_gamma(sigma_rel)
  gamma = float(gamma)
  if not gamma > -1.0:
    raise ValueError(f"`gamma` must be > -1, got {gamma}.")
  exponent = gamma + 1.0

  def log_decay(count: jax.Array) -> jax.Array:
    # log1p rather than log(1 - 1/t): `1 - 1/t` rounds to 1 in float32 past
    # t = 2**24 and would freeze the average.
    return exponent * jnp.log1p(-1.0 / (_float(count) + 1.0))

  return DecaySchedule(
      lambda count: jnp.exp(log_decay(count)),
      lambda count: -jnp.expm1(log_decay(count)),
      f"power_decay(gamma={gamma!r})",
      power_gamma=gamma,
  )


def half_life_decay(
    half_life: float,
    *,
    batch_size: float = 1,
    rampup_ratio: float | None = None,
) -> DecaySchedule:
  """A decay by half-life: a step's weight halves every `half_life` steps or samples.

  With the default `batch_size=1` the half-life is in optimizer steps and the
  decay is the constant `0.5 ** (1 / half_life)`. With a `batch_size`, it is
  in samples (images, tokens: EDM's `ema_halflife_kimg * 1000`), and the decay
  is `0.5 ** (batch_size / half_life)`, so changing the batch size keeps the
  horizon in samples. With `rampup_ratio` (EDM's `ema_rampup_ratio`, 0.05 in
  EDM) the half-life at averaged step `k` is capped to `k * batch_size *
  rampup_ratio`, the samples seen before that step times the ratio: EDM's
  training loop, `h = min(half_life, cur_nimg * rampup_ratio)` and
  `decay = 0.5 ** (batch_size / max(h, 1e-8))` with `cur_nimg = k *
  batch_size`. Its first averaged update (`k = 0`) copies the params.

  Args:
    half_life: in optimizer steps (`batch_size=1`) or in samples, positive.
    batch_size: the samples in one optimizer step, positive.
    rampup_ratio: `None` for a constant decay, or the ratio of the half-life
      to the samples seen so far during the ramp, positive.

  Precision: the weight `1 - decay` is `-expm1(-log(2) * batch_size / h)`, exact
  to float precision for half-lives of any length.

  Returns:
    A schedule `count -> decay`.

  Examples:
    >>> import ema_jax
    >>> round(float(ema_jax.half_life_decay(693.1)(0)), 6)
    0.999
    >>> edm = ema_jax.half_life_decay(500_000, batch_size=512, rampup_ratio=0.05)
    >>> [round(float(edm(k)), 4) for k in (0, 1, 100, 100_000)]
    [0.0, 0.0, 0.8706, 0.9993]
  """
  half_life = _checks.positive_float("half_life", half_life)
  batch_size = _checks.positive_float("batch_size", batch_size)
  name = f"half_life_decay({half_life!r}"
  if batch_size != 1:
    name += f", batch_size={batch_size!r}"
  if rampup_ratio is None:
    weight = -math.expm1(-math.log(2.0) * batch_size / half_life)
    return DecaySchedule(
        lambda count: _constant(1.0 - weight, count),
        lambda count: _constant(weight, count),
        name + ")",
    )
  rampup_ratio = _checks.positive_float("rampup_ratio", rampup_ratio)

  def log_decay(count: jax.Array) -> jax.Array:
    seen = _float(count) * batch_size  # EDM's `cur_nimg`: samples before this step
    h = jnp.maximum(jnp.minimum(half_life, seen * rampup_ratio), 1e-8)
    return -math.log(2.0) * batch_size / h

  return DecaySchedule(
      lambda count: jnp.exp(log_decay(count)),
      lambda count: -jnp.expm1(log_decay(count)),
      name + f", rampup_ratio={rampup_ratio!r})",
  )


def cosine_decay(start: float, end: float = 1.0, *, steps: int) -> DecaySchedule:
  """BYOL's and DINO's cosine momentum: from `start` at step 0 to `end` at `steps`.

  `end - (end - start) * (cos(pi * min(k, steps) / steps) + 1) / 2` at
  averaged step `k`: BYOL's target momentum `1 - (1 - tau_base) * (cos(pi k /
  K) + 1) / 2` with `start=tau_base` (0.996 in BYOL and DINO), `end=1` and
  `steps=K`, the number of training steps. After `steps` it stays at `end`.

  Args:
    start: the decay at step 0, in [0, 1].
    end: the decay from step `steps` on, in [0, 1].
    steps: the length of the cosine, in averaged steps, a positive int.

  Precision: the weight `1 - decay` is computed as `(1 - end) + (end - start) *
  sin(pi (steps - k) / (2 steps)) ** 2`, with no cancellation as the decay
  nears 1.

  Returns:
    A schedule `count -> decay`.

  Examples:
    >>> import ema_jax
    >>> schedule = ema_jax.cosine_decay(0.996, steps=1000)
    >>> [round(float(schedule(k)), 4) for k in (0, 500, 1000, 5000)]
    [0.996, 0.998, 1.0, 1.0]
  """
  start = _checks.unit_float("start", start)
  end = _checks.unit_float("end", end)
  steps = _checks.integer("steps", steps, 1)
  rest = 1.0 - end  # in float64

  def share(count: jax.Array) -> jax.Array:
    # (cos(pi x) + 1) / 2 = sin(pi (1 - x) / 2) ** 2: no cancellation near x = 1.
    left = _float(steps - jnp.minimum(jnp.maximum(count, 0), steps))
    return jnp.sin((math.pi / (2 * steps)) * left) ** 2

  return DecaySchedule(
      lambda count: end - (end - start) * share(count),
      lambda count: rest + (end - start) * share(count),
      f"cosine_decay({start!r}, {end!r}, steps={steps!r})",
  )


def uniform_decay() -> DecaySchedule:
  """The running mean of the averaged params: SWA and Polyak averaging.

  The decay `k / (k + 1)` at averaged step `k` (weight `1 / (k + 1)`) makes the
  average the plain mean of the params after every averaged update: with
  `ema(uniform_decay(), start_step=s)`, the mean of the params after updates
  `s + 1, ..., n` (torch's `swa_utils.AveragedModel` from step `s`). With
  `update_every=c` it is the mean of the params after every `c`-th update.

  Returns:
    A schedule `count -> decay`, 0 at `count=0`.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.ema(ema_jax.uniform_decay()))
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> for g in (-3.0, -3.0, -3.0):  # params 3, 6, 9
    ...   updates, state = tx.update(jnp.array([g]), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> ema_jax.ema_params(state)
    Array([6.], dtype=float32)
  """

  def schedule(count: jax.Array) -> jax.Array:
    k = _float(count)
    return k / (k + 1.0)

  def complement(count: jax.Array) -> jax.Array:
    return 1.0 / (_float(count) + 1.0)

  return DecaySchedule(schedule, complement, "uniform_decay()")


def scale_decay(decay: Decay, factor: float) -> DecaySchedule:
  """`decay ** factor`: the EMA scaling rule for a batch size scaled by `factor`.

  Busbridge et al. (2023) keep the dynamics of a model EMA when the batch size
  (and the learning rate with it) is scaled by `factor` by raising the decay
  to that power: `decay ** factor`, the decay over `factor` steps. `decay` may
  be a float or a schedule; a schedule is scaled at every step.

  Args:
    decay: a decay in [0, 1], or a schedule (as `ema`'s `decay`).
    factor: the batch-size scale, positive (2 for twice the batch size).

  Precision: the weight is `-expm1(factor * log1p(-w))` from the schedule's
  own weight `w = 1 - decay`, so it keeps the precision of `w`.

  Returns:
    A schedule `count -> decay ** factor`.

  Examples:
    >>> import ema_jax
    >>> schedule = ema_jax.scale_decay(0.999, 4)
    >>> round(float(schedule(0)), 6)  # 0.999 ** 4
    0.996006
    >>> round(float(ema_jax.scale_decay(ema_jax.power_decay(gamma=7.0), 2)(9)), 4)
    0.1853
  """
  schedule = as_schedule(decay)
  factor = _checks.positive_float("factor", factor)
  weight = weight_fn(schedule)

  def log_decay(count: jax.Array) -> jax.Array:
    return factor * jnp.log1p(-jnp.asarray(weight(count)))

  return DecaySchedule(
      lambda count: jnp.exp(log_decay(count)),
      lambda count: -jnp.expm1(log_decay(count)),
      f"scale_decay({schedule!r}, {factor!r})",
  )
