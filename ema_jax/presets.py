"""Presets that reproduce other libraries' EMAs, step 0 and off-by-one included.

Each preset returns a transformation used exactly like `ema_jax.ema()` (last in
an `optax.chain`), whose average equals, to float32 rounding, what that library
computes for the same sequence of parameter values, with its own argument
names and defaults. In the notation below `k` is the number of optimizer
updates done before the current one (0 at the first), `t = k + 1`, and `p_t`
are the params after update `t`; every library averages after the update.

Every preset takes the first argument of the library's constructor
positionally and everything else by keyword, with the library's names, plus
the storage options of `ema_jax.ema`: `ema_dtype`, `mask`, `rounding`, `key`
and `memory_kind` (e.g. timm's EMA with a bfloat16, stochastically rounded
average kept in host memory).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ema_jax import _checks
from ema_jax import _engine
from ema_jax import _schedules
from ema_jax._leaves import Mask
from ema_jax._memory import MemoryKind
from ema_jax._rounding import Rounding

__all__ = ["keras", "tfa", "timm", "diffusers", "ema_pytorch"]


def _shifted(
    schedule: _schedules.Schedule, shift: int
) -> _schedules.DecaySchedule:
  weight = _schedules.weight_fn(schedule)

  def moved(count: jax.Array) -> jax.Array:
    # Saturate rather than wrap around at the int32 limit.
    return jnp.minimum(count, _checks.INT32_MAX - shift) + shift

  return _schedules.DecaySchedule(
      lambda count: schedule(moved(count)),
      lambda count: weight(moved(count)),
      f"{schedule!r} shifted by {shift}",
  )


def _floored_tf_ramp(decay: float, min_decay: float) -> _schedules.DecaySchedule:
  """diffusers' default: `max(min(decay, (1 + k) / (10 + k)), min_decay)`."""
  ramp = _schedules.tf_dynamic_decay(decay)
  floor = _checks.unit_float("min_decay", min_decay)
  return _schedules.DecaySchedule(
      lambda count: jnp.maximum(ramp(count), floor),
      lambda count: jnp.minimum(ramp.weight(count), 1.0 - floor),
      f"max({ramp!r}, {floor!r})",
  )


def _after_warmup_schedule(
    decay: float,
    min_decay: float,
    use_warmup: bool,
    gamma: float,
    power: float,
    ramp: str,
) -> _schedules.DecaySchedule:
  # timm and diffusers evaluate their schedule at s = t - update_after_step - 1,
  # which is 1 at the first averaged update; ema() counts that update as 0.
  base: _schedules.Schedule
  if _checks.boolean("use_warmup", use_warmup):
    base = _schedules.warmup_decay(
        decay, inv_gamma=gamma, power=power, min_decay=min_decay
    )
  elif ramp == "tf":
    base = _floored_tf_ramp(decay, min_decay)
  else:
    base = _schedules.constant_decay(decay)
  return _shifted(base, 1)


def keras(
    ema_momentum: float = 0.99,
    *,
    ema_overwrite_frequency: int | None = None,
    ema_dtype: Any = None,
    mask: Mask = None,
    rounding: Rounding = "nearest",
    key: Any = 0,
    memory_kind: MemoryKind = None,
) -> optax.GradientTransformation:
  """Keras 3's `optimizer(use_ema=True, ema_momentum, ema_overwrite_frequency)`.

  `e_1 = p_1` (the first update copies), then `e_t = m e_{t-1} + (1 - m) p_t`.
  With `ema_overwrite_frequency=F`, after the EMA update at steps F, 2F, ...
  the params are set to the EMA, through the updates this returns (training
  continues from the EMA; the EMA itself is unchanged). The average is
  computed with Keras' own float32 arithmetic, `m * e + (1 - m) * p`, so it
  equals Keras' bit for bit where Keras runs op by op.

  Args:
    ema_momentum: Keras' `ema_momentum`, in [0, 1].
    ema_overwrite_frequency: Keras' `ema_overwrite_frequency`, an int >= 1 or
      None. The write-back is exact as Keras' assignment is for bfloat16 and
      float16 params (their updates are then float32, so `p + u` can reach
      the EMA: under strict dtype promotion apply them with
      `jnp.asarray(p + u.astype(...))` yourself), unless a param is over
      2**16 (float16: 2**13) times its EMA; float32 params get the float32
      `p + u` nearest the EMA (no float32 `u` gives `0.3 + u == -0.001`
      exactly).
    ema_dtype: the average's dtype, as in `ema_jax.ema`.
    mask: which floating leaves to average, as in `ema_jax.ema`.
    rounding: `'nearest'` or `'stochastic'`, as in `ema_jax.ema`.
    key: the stochastic rounding's key or seed, as in `ema_jax.ema`.
    memory_kind: where the average lives, as in `ema_jax.ema`.

  Returns:
    An `optax.GradientTransformation` to put last in a chain.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.presets.keras(0.9))
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(jnp.array([-1.0]), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> params, ema_jax.ema_params(state)  # e_1 = 1, e_2 = 0.9 + 0.2
    (Array([2.], dtype=float32), Array([1.1], dtype=float32))
  """
  schedule = _schedules.as_schedule(ema_momentum, "ema_momentum")

  def rule(count: jax.Array) -> _engine.Step:
    # Keras: momentum = (iterations != 0) * ema_momentum, in float32.
    keep = jnp.where(count < 1, 0.0, schedule(jnp.maximum(count - 1, 0)))
    return _engine.Step(jnp.ones((), bool), 1 - keep, keep)

  return _engine.transformation(
      rule,
      None,
      overwrite_every=ema_overwrite_frequency,
      ema_dtype=ema_dtype,
      mask=mask,
      rounding=rounding,
      key=key,
      memory_kind=memory_kind,
  )


def tfa(
    average_decay: float = 0.99,
    *,
    num_updates: int | None = None,
    start_step: int = 0,
    dynamic_decay: bool = False,
    ema_dtype: Any = None,
    mask: Mask = None,
    rounding: Rounding = "nearest",
    key: Any = 0,
    memory_kind: MemoryKind = None,
) -> optax.GradientTransformation:
  """TensorFlow Addons' `MovingAverage(opt, average_decay, num_updates, start_step, dynamic_decay)`.

  The average starts as a copy of the initial params; `decay = 0` while
  `k < start_step`, else `min(d, (1 + j) / (10 + j))` with `j = k - start_step`
  when `dynamic_decay`, else `d`; `e <- e - (1 - decay) (e - p)`.

  Args:
    average_decay: TFA's `average_decay`.
    start_step: TFA's `start_step`.
    dynamic_decay: TFA's `dynamic_decay`.
    num_updates: TFA's `num_updates`: when given, an int `n` that caps
      `average_decay` at `(1 + n) / (10 + n)` once, when the transformation is
      built (TFA reads it once, at construction).
    ema_dtype: the average's dtype, as in `ema_jax.ema`.
    mask: which floating leaves to average, as in `ema_jax.ema`.
    rounding: `'nearest'` or `'stochastic'`, as in `ema_jax.ema`.
    key: the stochastic rounding's key or seed, as in `ema_jax.ema`.
    memory_kind: where the average lives, as in `ema_jax.ema`.

  Returns:
    An `optax.GradientTransformation` to put last in a chain (or use
    `ema_jax.moving_average` to wrap the optimizer the TFA way).

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.presets.tfa(0.9, dynamic_decay=True))
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([-1.0]), state, params)
    >>> ema_jax.ema_params(state)  # decay min(0.9, 1/10) = 0.1: 0.1*0 + 0.9*1
    Array([0.9], dtype=float32)
  """
  if num_updates is not None:
    n = _checks.integer("num_updates", num_updates, 0)
    average_decay = min(
        _checks.unit_float("average_decay", average_decay),
        (1.0 + n) / (10.0 + n),
    )
  schedule: _schedules.Schedule
  if _checks.boolean("dynamic_decay", dynamic_decay):
    schedule = _schedules.tf_dynamic_decay(average_decay)
  else:
    schedule = _schedules.as_schedule(average_decay, "average_decay")
  start_step = _checks.integer("start_step", start_step, 0)
  return _engine.transformation(
      _engine.schedule_rule([schedule], start_step, 1),
      None,
      ema_dtype=ema_dtype,
      mask=mask,
      rounding=rounding,
      key=key,
      memory_kind=memory_kind,
  )


def timm(
    decay: float = 0.9999,
    *,
    min_decay: float = 0.0,
    use_warmup: bool = False,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2.0 / 3.0,
    update_after_step: int = 0,
    ema_dtype: Any = None,
    mask: Mask = None,
    rounding: Rounding = "nearest",
    key: Any = 0,
    memory_kind: MemoryKind = None,
) -> optax.GradientTransformation:
  """timm's `ModelEmaV3`, updated as timm's train script does: `update(model, step=t)`.

  `s = max(0, t - update_after_step - 1)`; `decay = 0` (copy) if `s <= 0`;
  with `use_warmup`, `clip(1 - (1 + s / warmup_gamma) ** -warmup_power,
  min_decay, decay)`, else `decay`; `e <- lerp(e, p, 1 - decay)`. timm also
  averages floating buffers (BatchNorm statistics): include them in the tree
  you pass as params to get the same.

  Args:
    decay: timm's `decay`.
    min_decay: timm's `min_decay` (used with warm-up only, as in timm).
    use_warmup: timm's `use_warmup`.
    warmup_gamma: timm's `warmup_gamma`.
    warmup_power: timm's `warmup_power`.
    update_after_step: timm's `update_after_step`.
    ema_dtype: the average's dtype, as in `ema_jax.ema`.
    mask: which floating leaves to average, as in `ema_jax.ema`.
    rounding: `'nearest'` or `'stochastic'`, as in `ema_jax.ema`.
    key: the stochastic rounding's key or seed, as in `ema_jax.ema`.
    memory_kind: where the average lives, as in `ema_jax.ema`.

  Returns:
    An `optax.GradientTransformation` to put last in a chain.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.presets.timm(0.5))
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(jnp.array([-1.0]), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> ema_jax.ema_params(state)  # step 1 copies 1; step 2: 0.5*1 + 0.5*2
    Array([1.5], dtype=float32)
  """
  # Averaging starts at update `update_after_step + 1`: an int32 count too.
  uas = _checks.integer(
      "update_after_step", update_after_step, 0, _checks.INT32_MAX - 1
  )
  schedule = _after_warmup_schedule(
      decay, min_decay, use_warmup, warmup_gamma, warmup_power, ramp="constant"
  )
  return _engine.transformation(
      _engine.schedule_rule([_schedules.as_schedule(schedule)], uas + 1, 1),
      None,
      ema_dtype=ema_dtype,
      mask=mask,
      rounding=rounding,
      key=key,
      memory_kind=memory_kind,
  )


def diffusers(
    decay: float = 0.9999,
    *,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_ema_warmup: bool = False,
    inv_gamma: float = 1.0,
    power: float = 2.0 / 3.0,
    ema_dtype: Any = None,
    mask: Mask = None,
    rounding: Rounding = "nearest",
    key: Any = 0,
    memory_kind: MemoryKind = None,
) -> optax.GradientTransformation:
  """diffusers' `EMAModel`, stepped once per optimizer update.

  `s = max(0, t - update_after_step - 1)`; `decay = 0` (copy) if `s <= 0`;
  otherwise `1 - (1 + s / inv_gamma) ** -power` with `use_ema_warmup`, else
  `(1 + s) / (10 + s)` (note: *not* constant by default), then
  `max(min(value, decay), min_decay)`; `e <- e - (1 - decay) (e - p)`.

  Args:
    decay: diffusers' `decay`.
    min_decay: diffusers' `min_decay`.
    update_after_step: diffusers' `update_after_step`.
    use_ema_warmup: diffusers' `use_ema_warmup`.
    inv_gamma: diffusers' `inv_gamma`.
    power: diffusers' `power`.
    ema_dtype: the average's dtype, as in `ema_jax.ema`.
    mask: which floating leaves to average, as in `ema_jax.ema`.
    rounding: `'nearest'` or `'stochastic'`, as in `ema_jax.ema`.
    key: the stochastic rounding's key or seed, as in `ema_jax.ema`.
    memory_kind: where the average lives, as in `ema_jax.ema`.

  Returns:
    An `optax.GradientTransformation` to put last in a chain.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.presets.diffusers())
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(jnp.array([-1.0]), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> ema_jax.ema_params(state)  # step 1 copies 1; step 2 decay 2/11
    Array([1.8181819], dtype=float32)
  """
  # Averaging starts at update `update_after_step + 1`: an int32 count too.
  uas = _checks.integer(
      "update_after_step", update_after_step, 0, _checks.INT32_MAX - 1
  )
  schedule = _after_warmup_schedule(
      decay, min_decay, use_ema_warmup, inv_gamma, power, ramp="tf"
  )
  return _engine.transformation(
      _engine.schedule_rule([_schedules.as_schedule(schedule)], uas + 1, 1),
      None,
      ema_dtype=ema_dtype,
      mask=mask,
      rounding=rounding,
      key=key,
      memory_kind=memory_kind,
  )


def ema_pytorch(
    beta: float = 0.9999,
    *,
    update_after_step: int = 100,
    update_every: int = 10,
    inv_gamma: float = 1.0,
    power: float = 2.0 / 3.0,
    min_value: float = 0.0,
    ema_dtype: Any = None,
    mask: Mask = None,
    rounding: Rounding = "nearest",
    key: Any = 0,
    memory_kind: MemoryKind = None,
) -> optax.GradientTransformation:
  """ema-pytorch's `EMA(beta, update_after_step, update_every, inv_gamma, power, min_value)`.

  `EMA.update()` is called once per optimizer update. The first call copies;
  after it only calls with `k % update_every == 0` act; those with
  `k <= update_after_step` copy; the
  others lerp with `clip(1 - (1 + epoch / inv_gamma) ** -power, min_value,
  beta)`, `epoch = k - update_after_step`. As in ema-pytorch the decay is *not*
  compensated for the skipped calls (use `ema_jax.ema(update_every=...)` for a
  horizon that does not depend on `update_every`).

  Args:
    beta: ema-pytorch's `beta`.
    update_after_step: ema-pytorch's `update_after_step`.
    update_every: ema-pytorch's `update_every`.
    inv_gamma: ema-pytorch's `inv_gamma`.
    power: ema-pytorch's `power`.
    min_value: ema-pytorch's `min_value`.
    ema_dtype: the average's dtype, as in `ema_jax.ema`.
    mask: which floating leaves to average, as in `ema_jax.ema`.
    rounding: `'nearest'` or `'stochastic'`, as in `ema_jax.ema`.
    key: the stochastic rounding's key or seed, as in `ema_jax.ema`.
    memory_kind: where the average lives, as in `ema_jax.ema`.

  Returns:
    An `optax.GradientTransformation` to put last in a chain.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.presets.ema_pytorch(
    ...     update_after_step=0, update_every=2))
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jnp.array([-1.0]), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> ema_jax.ema_params(state)  # k=0 copies 1; k=2: epoch 2, decay 1 - 3**(-2/3)
    Array([1.9614997], dtype=float32)
  """
  uas = _checks.integer("update_after_step", update_after_step, 0)
  every = _checks.integer("update_every", update_every, 1)
  schedule = _schedules.warmup_decay(
      beta, inv_gamma=inv_gamma, power=power, min_decay=min_value
  )

  def rule(count: jax.Array) -> _engine.Step:
    epoch = count - uas
    weight = jnp.where(epoch <= 0, 1.0, schedule.weight(jnp.maximum(epoch, 0)))
    return _engine.Step(count % every == 0, weight)

  return _engine.transformation(
      rule,
      None,
      ema_dtype=ema_dtype,
      mask=mask,
      rounding=rounding,
      key=key,
      memory_kind=memory_kind,
  )
