"""The EMA transformations: `ema()`, `multi_ema()` and the wrapper form."""

from __future__ import annotations

from typing import Any, Sequence, cast

import optax

from ema_jax import _checks
from ema_jax import _engine
from ema_jax import _schedules
from ema_jax._leaves import Mask
from ema_jax._memory import MemoryKind
from ema_jax._rounding import Rounding
from ema_jax._schedules import Decay
from ema_jax._state import PowerProfile


def ema(
    decay: Decay = 0.999,
    *,
    start_step: int = 0,
    update_every: int = 1,
    debias: bool = False,
    ema_dtype: Any = None,
    mask: Mask = None,
    rounding: Rounding = "nearest",
    key: Any = 0,
    memory_kind: MemoryKind = None,
) -> optax.GradientTransformation:
  """An exponential moving average of the parameters, kept in the optimizer state.

  Put it last in an `optax.chain`: it passes `updates` through unchanged and
  averages the parameters *after* the update, `params + updates`:

  ```text
  e <- e + (1 - decay) * (params + updates - e)
  ```

  The weight `1 - decay` is computed without cancellation (from the Python
  float in float64; for ema_jax's schedules in closed form, see
  `DecaySchedule`), so decays near 1 average with the right weight in float32:
  `ema(0.9999999)` with 1e-7, not the 1.19e-7 of `1 - float32(0.9999999)`.
  With x64 on, float64 averages use a float64 weight.

  The average starts as a copy of the params given to `init`. Read it with
  `ema_jax.ema_params(opt_state)`, or evaluate with it through `ema_jax.swap`.

  Leaves: floating leaves are averaged; integer, boolean and PRNG-key leaves
  are carried (the average holds their latest value); leaves excluded by `mask`
  are not stored at all (`None` in the average) and `swap` leaves them alone.

  Non-finite values: the average of a NaN or inf is NaN or inf, and it stays
  so while it decays (a copy, e.g. during `start_step`, clears it). To skip
  such updates, wrap the whole chain, EMA included:
  `optax.apply_if_finite(optax.chain(opt, ema), max_consecutive_errors)`
  (wrapping the optimizer alone still moves the EMA on a skipped step).

  Args:
    decay: the weight of the old average: a float in [0, 1]; a float32 (or
      wider) scalar that may be traced (from `optax.inject_hyperparams(
      ema_jax.ema)(decay=0.999)`, a `jax.vmap` over decays, or computed in
      the step); or a schedule (a jax-traceable callable of the step count
      returning a float32 or wider scalar, e.g.
      `ema_jax.warmup_decay(0.9999)`). The schedule's step is the number of
      updates since averaging began (0 at the first averaged update). A
      schedule is checked when the transformation is built, in one compiled
      evaluation on an array of steps: every step up to 1024 and 256 steps
      spaced in log scale up to `2**30` (a schedule that only takes a scalar
      count: every step up to 64 and 64 more up to `2**16`, under `vmap`); it
      must lie in [0, 1] at all of them. A traced decay, or a schedule of
      one, is checked when it is concrete. At run time any decay outside
      [0, 1] is clipped into it (above 1 keeps the average, below 0 copies
      the params) and NaN keeps the average, so the average never leaves
      the range of the params. A bfloat16/float16 decay is refused (0.999
      is 1.0 there): with `inject_hyperparams` and low-precision params pass
      `hyperparam_dtype=jnp.float32`.
    start_step: for the first `start_step` updates the average copies the new
      params (TensorFlow Addons' `start_step`; Keras' first step is
      `start_step=1`). An int, or a traced int32 scalar
      (`inject_hyperparams` injects it), clamped to `[0, 2**31 - 1]`.
    update_every: average on every `update_every`-th update only. The decay is
      compensated (`decay ** update_every` for a constant decay; the product of
      the schedule over the skipped steps in general, computed on the
      updates that average only), so the averaging horizon in optimizer
      steps does not change. Skipped updates leave the average as it is.
      An int, or a traced int32 scalar (clamped to at least 1). Once the
      int32 count saturates (`2**31 - 1` updates), every update averages with
      the one-step decay.
    debias: start from zero and divide by the total weight, like Adam's bias
      correction: the average is unbiased from the first update (its first
      update is a copy). Kept in debiased form, so reading it costs nothing.
    ema_dtype: the dtype of the average. `None` keeps float32/float64 params'
      dtype and stores float32 for bfloat16/float16 params (a bfloat16 average
      with decay 0.999 stops moving: `1 - decay` is below its resolution).
    mask: which floating leaves to average, as in optax: a tree of bools with
      the params' structure (or a prefix of it), or a callable of the params
      returning one.
    rounding: how the float32 average is stored in a narrower `ema_dtype`.
      `'nearest'` (default) rounds to nearest. `'stochastic'` (needs
      `ema_dtype=jnp.bfloat16`) rounds up or down at random, in proportion to
      the distance, so the stored average is unbiased and keeps moving at
      decays where a round-to-nearest bfloat16 average stalls: half the memory
      of a float32 average, with a small zero-mean noise. The key is carried
      in the state (`EmaState.rounding_key`) and split at every update.
    key: with `rounding='stochastic'`, a PRNG key or an int seed for the
      rounding (as `optax.add_noise` takes); unused otherwise.
    memory_kind: where the average lives. `None` (default) or `'device'`:
      device memory. `'pinned_host'`: host memory (host offload); each update
      moves the average to the device and back inside the jitted step, as
      transfers XLA schedules, so the device holds no average between steps.
      `swap` (and the Flax hook) brings it to device memory to evaluate,
      `ema_params(state, memory_kind='device')` too. Carried leaves (ints,
      bools, PRNG keys) stay in device memory, where their params are. Commit
      the params to the device (`jax.device_put(params)`) before the first
      step: the offloaded average is committed, and uncommitted params make
      the jitted step compile a second time.

  Returns:
    An `optax.GradientTransformation` with state `EmaState`.

  Raises:
    TypeError: when built, for a decay, flag or count of the wrong type
      (`ema("0.9")`, `debias="no"`), a decay or schedule value narrower
      than float32, a schedule that cannot be traced, or a traced
      `start_step` / `update_every` that is not an integer scalar; at
      `init`, for a leaf that is not an array (the message names its path).
    ValueError: when built, for a decay outside [0, 1] (a schedule's at any
      probed step), a schedule that does not return a scalar, `start_step`
      or `update_every` outside the int32 range they count in, an
      `ema_dtype` that is not bfloat16/float16/float32/float64 (or
      complex64/complex128), a 64-bit `ema_dtype` with x64 off,
      `rounding='stochastic'` without `ema_dtype=jnp.bfloat16`, a `key`
      seed out of range, an unknown `memory_kind`; at `init`, for a
      `memory_kind` the device lacks, or an `ema_dtype` that is real for a
      complex leaf (or complex for a real one); at `update` (at trace time
      under `jit`), for a swapped state, missing `params`, or params whose
      structure, shapes or dtypes differ from the state's (the message
      names the leaf).

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> opt_state = tx.init(params)
    >>> grads = {"w": jnp.array([1.0, 1.0])}
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"], ema_jax.ema_params(opt_state)["w"]
    (Array([0.9, 1.9], dtype=float32), Array([0.99, 1.99], dtype=float32))
  """
  storage = dict(debias=debias, ema_dtype=ema_dtype, mask=mask,
                 rounding=rounding, key=key, memory_kind=memory_kind)
  return _build([decay], False, start_step, update_every, storage)


def multi_ema(
    decays: Sequence[Decay],
    *,
    start_step: int = 0,
    update_every: int = 1,
    debias: bool = False,
    ema_dtype: Any = None,
    mask: Mask = None,
    rounding: Rounding = "nearest",
    key: Any = 0,
    memory_kind: MemoryKind = None,
) -> optax.GradientTransformation:
  """Several EMAs of the params at once, updated together in one fused step.

  Average `i` equals `ema_jax.ema(decays[i], **same_options)` bit for bit
  (with `rounding='stochastic'` each average gets its own, independent
  noise), but all of them are kept stacked on a new leading axis of each
  averaged leaf, so one elementwise update per leaf serves all of them: the
  same engine as `ema`, with a leading axis. Pick one with
  `ema_jax.ema_params(state, index=i)` or `ema_jax.swap(params, state,
  index=i)`. Use it for the two power-function EMAs of post-hoc EMA
  (`ema_jax.posthoc.Snapshotter.ema`) or to compare decays in one run.

  The stacked leaves are sharded like the params on the trailing axes and not
  at all on the leading one, so each device holds all averages of its shard.

  Args:
    decays: a non-empty sequence of decays, each a float in [0, 1] or a
      schedule, as `decay` in `ema_jax.ema`.
    start_step: updates that copy the params before averaging starts (shared).
    update_every: average every `update_every`-th update, with the decay
      compensated as in `ema_jax.ema` (shared).
    debias: as in `ema_jax.ema`, for each average.
    ema_dtype: dtype of the averages; `None` as in `ema_jax.ema`.
    mask: which floating leaves to average, as in `ema_jax.ema`.
    rounding: as in `ema_jax.ema`.
    key: as in `ema_jax.ema`.
    memory_kind: as in `ema_jax.ema`: `'pinned_host'` keeps all the averages
      in host memory.

  Returns:
    An `optax.GradientTransformation` with state `MultiEmaState`.

  Raises:
    ValueError, TypeError: when built, for an empty `decays` or any setting
      that `ema_jax.ema` refuses (the message names `decays[i]`).

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.multi_ema([0.5, 0.9]))
    >>> params = {"w": jnp.array([0.0, 0.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([-1.0, -2.0])}, state, params)
    >>> ema_jax.ema_params(state, index=0)["w"], ema_jax.ema_params(state, index=1)["w"]
    (Array([0.5, 1. ], dtype=float32), Array([0.1, 0.2], dtype=float32))
    >>> state[1].ema["w"].shape  # both averages, stacked
    (2, 2)
  """
  if isinstance(decays, (str, bytes)) or not isinstance(decays, Sequence):
    raise TypeError(
        "`decays` must be a sequence of floats or schedules, e.g. "
        f"`[0.999, 0.9999]`, got {decays!r}."
    )
  if not decays:
    raise ValueError("`decays` is empty; give at least one decay.")
  storage = dict(debias=debias, ema_dtype=ema_dtype, mask=mask,
                 rounding=rounding, key=key, memory_kind=memory_kind)
  return _build(decays, True, start_step, update_every, storage)


def _build(
    decays: Sequence[Decay],
    stacked: bool,
    start_step: Any,
    update_every: Any,
    storage: dict[str, Any],
) -> optax.GradientTransformation:
  """`ema` (one decay, not stacked) and `multi_ema` share this one body."""
  names = [f"decays[{i}]" if stacked else "decay" for i in range(len(decays))]
  schedules = [_schedules.as_schedule(d, name) for d, name in zip(decays, names)]
  start_step = _checks.integer("start_step", start_step, 0, traced=True)
  update_every = _checks.integer("update_every", update_every, 1, traced=True)
  return _engine.transformation(
      _engine.schedule_rule(schedules, start_step, update_every),
      len(schedules) if stacked else None,
      power_profile=_power_profile(schedules, start_step, update_every),
      **storage,
  )


def _power_profile(
    schedules: Sequence[Any], start_step: Any, update_every: Any
) -> PowerProfile | None:
  """The profile of averages that are power functions of the update count
  from the first update on (`start_step` would shift them; a traced
  `update_every` is not known), else `None`."""
  gammas = tuple(getattr(s, "power_gamma", None) for s in schedules)
  if (None in gammas or not isinstance(start_step, int) or start_step != 0
      or not isinstance(update_every, int)):
    return None
  return PowerProfile(cast(tuple[float, ...], gammas), update_every)


def moving_average(
    optimizer: optax.GradientTransformation,
    average_decay: Decay = 0.99,
    *,
    start_step: int = 0,
    dynamic_decay: bool = False,
    **kwargs: Any,
) -> optax.GradientTransformation:
  """An optimizer that also keeps the EMA of the params: TFA's `MovingAverage`.

  The same as `optax.chain(optimizer, ema_jax.ema(...))`: the average starts as
  a copy of the initial params, copies the params for the first `start_step`
  updates, then averages with `average_decay`, or with TensorFlow's ramp
  `min(average_decay, (1 + j) / (10 + j))` (`j` = updates since `start_step`)
  when `dynamic_decay=True`.

  Args:
    optimizer: any optax `GradientTransformation`.
    average_decay: the decay, a float in [0, 1] (or a schedule when
      `dynamic_decay=False`).
    start_step: updates that copy before averaging starts.
    dynamic_decay: use TensorFlow's ramp up to `average_decay`.
    **kwargs: passed to `ema_jax.ema` (`update_every`, `debias`, `ema_dtype`,
      `mask`, `rounding`, `key`, `memory_kind`).

  Returns:
    One `optax.GradientTransformation`; `ema_jax.ema_params` and
    `ema_jax.swap` find the average in its state.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = ema_jax.moving_average(optax.sgd(1.0), 0.5)
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([-2.0]), state, params)
    >>> ema_jax.ema_params(state)  # 0.5 * 0 + 0.5 * 2
    Array([1.], dtype=float32)
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        "`optimizer` must be an optax.GradientTransformation, got "
        f"{type(optimizer).__name__}."
    )
  if _checks.boolean("dynamic_decay", dynamic_decay):
    if callable(average_decay):
      raise TypeError(
          "`dynamic_decay=True` needs a float `average_decay` (it caps the "
          "ramp); pass a schedule with dynamic_decay=False instead."
      )
    average_decay = _schedules.tf_dynamic_decay(average_decay)
  return optax.chain(
      optimizer, ema(average_decay, start_step=start_step, **kwargs)
  )
