"""The EMA transformation: `ema()` and the wrapper form `moving_average()`."""

from __future__ import annotations

import operator
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import optax

from ema_jax import _memory
from ema_jax import _rounding
from ema_jax import _schedules
from ema_jax import _tree
from ema_jax._state import EmaState, SwappedEmaState

DecayLike = Union[float, Callable[[jax.Array], jax.Array]]
# A rule maps the update count (0-based) to (average this update?, decay).
# A decay of 0 copies the new params.
Rule = Callable[[jax.Array], "tuple[jax.Array, jax.Array]"]

_PROBE_COUNTS = (0, 1, 2, 9, 10, 100, 1_000, 10_000, 1_000_000)


def as_schedule(decay: DecayLike, name: str = "decay") -> _schedules.Schedule:
  """A validated schedule from a float or a callable of the step count."""
  if isinstance(decay, bool):
    raise TypeError(f"`{name}` must be a float or a schedule, got a bool.")
  if not callable(decay):
    return _schedules.constant_decay(_schedules._check_unit_interval(name, decay))
  try:
    out = jax.eval_shape(decay, jax.ShapeDtypeStruct((), jnp.int32))
  except Exception as e:  # the user's schedule: any failure is theirs to see
    raise TypeError(
        f"The `{name}` schedule fails on a traced step count: {e!r}. A schedule "
        "must be a jax-traceable function of an int32 array (use jnp.where, "
        "not `if`), like optax's schedules."
    ) from e
  if getattr(out, "shape", None) != ():
    raise ValueError(
        f"The `{name}` schedule must return a scalar, but returns shape "
        f"{getattr(out, 'shape', None)} for a scalar step count."
    )
  with jax.ensure_compile_time_eval():
    for k in _PROBE_COUNTS:
      value = float(decay(jnp.asarray(k, jnp.int32)))
      if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"The `{name}` schedule returns {value} at step {k}; a decay must "
            "be in [0, 1]."
        )
  return decay


def _check_int(name: str, value: Any, minimum: int) -> int:
  try:
    if isinstance(value, bool):
      raise TypeError
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"`{name}` must be an int, got {value!r}.") from None
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
  return value


def schedule_rule(
    schedule: _schedules.Schedule, start_step: int, update_every: int
) -> Rule:
  """Copy for `start_step` updates, then average every `update_every`-th one.

  An update at `j` updates after averaging began averages with the product of
  the schedule over the `update_every` steps it stands for, so the horizon in
  optimizer steps does not depend on `update_every` (for a constant decay this
  is `decay ** update_every`; for a power profile it is EDM2's
  `(1 - k / t) ** (gamma + 1)`).
  """

  def rule(count: jax.Array) -> tuple[jax.Array, jax.Array]:
    j = count - start_step
    copying = j < 0
    j = jnp.maximum(j, 0)
    if update_every == 1:
      decay = jnp.asarray(schedule(j))
      due = jnp.ones((), bool)
    else:
      steps = j - jnp.arange(update_every - 1, -1, -1, dtype=j.dtype)
      decays = jax.vmap(schedule)(jnp.maximum(steps, 0))
      # exp(sum(log)) keeps the product accurate for decays near 1.
      decay = jnp.exp(jnp.sum(jnp.log1p(decays - 1.0)))
      due = (j + 1) % update_every == 0
    decay = jnp.where(copying, jnp.zeros_like(decay), decay)
    return copying | due, decay

  return rule


def _copy(x: jax.Array, dtype: Any = None) -> jax.Array:
  # A real copy even under jit: a jitted function that returns its input
  # unchanged hands back the same buffer, and donating the state would then
  # delete the params.
  return jnp.array(x, dtype=dtype, copy=True)


def _apply_update(p: jax.Array, u: Any) -> jax.Array:
  """`optax.apply_updates` for one leaf, tolerating None/float0 updates."""
  if u is None or getattr(u, "dtype", None) == jax.dtypes.float0:
    return p
  return _materialize(jnp.asarray(p + u).astype(p.dtype))


def _materialize(new_p: jax.Array) -> jax.Array:
  """Make the EMA read the new params from memory instead of recomputing them.

  In a jitted step with donated params, XLA:CPU otherwise folds `p + u` into the
  EMA loop for bfloat16 params; as the params loop overwrites `p` in place, it
  must then copy `p` and materialise `u` first: two params-sized temporaries
  and ~1.6x the bytes (benchmarks/run.py, tests/test_performance.py). Other
  backends fuse the two outputs themselves and keep the plain expression.
  """
  if not isinstance(new_p, jax.core.Tracer):
    return new_p
  return jax.lax.platform_dependent(
      new_p, cpu=jax.lax.optimization_barrier, default=lambda x: x
  )


def _average(
    e: jax.Array,
    p: jax.Array,
    active: jax.Array | None,
    decay: jax.Array,
    key: jax.Array | None = None,
) -> jax.Array:
  """One EMA step of leaf `e` towards `p`; where `active` is False, `e` as is.

  `active=None` means always active (the caller decided already).
  """
  compute = jnp.promote_types(e.dtype, jnp.float32)
  ef, pf = e.astype(compute), p.astype(compute)
  d = decay.astype(compute)
  # Keras' form `d * e + (1 - d) * p`: exact at d = 0 and d = 1.
  mixed = jnp.where(d == 0, pf, d * ef + (1 - d) * pf)
  if key is None:
    stored = mixed.astype(e.dtype)
  else:
    stored = _rounding.stochastic_round(mixed, key)
  return stored if active is None else jnp.where(active, stored, e)


def unpack_update(
    updates: Any,
    state: Any,
    params: Any,
    mask: _tree.MaskOrFn,
    *,
    swapped: type,
    what: str,
) -> tuple[list[Any], Any, list[Any], list[Any], list[_tree.Kind]]:
  """Refuse a swapped state or missing params; align updates and state leaves.

  Returns the params' `(path, leaf)` pairs, their treedef, the updates' and the
  state's leaves aligned with them, and each leaf's kind.
  """
  if isinstance(state, swapped):
    raise RuntimeError(
        f"ema_jax: `update` got a swapped {what}: the EMA weights are in "
        "`params` and the raw weights are held in the optimizer state. Swap "
        "back first: `params, opt_state = ema_jax.swap(params, opt_state)`."
    )
  if params is None:
    raise ValueError(
        "ema_jax needs `params`: call `tx.update(grads, opt_state, params)` "
        "(the EMA is taken of `params + updates`)."
    )
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  u_leaves = _tree.flatten_like(treedef, updates, "updates")
  e_leaves = _tree.flatten_like(treedef, state.ema, what)
  return flat, treedef, u_leaves, e_leaves, _tree.leaf_kinds(params, mask)


def make_ema(
    rule: Rule,
    *,
    debias: bool = False,
    ema_dtype: Any = None,
    mask: _tree.MaskOrFn = None,
    overwrite_every: int | None = None,
    rounding: str = "nearest",
    key: jax.Array | int = 0,
    memory_kind: str | None = None,
) -> optax.GradientTransformation:
  """The EMA transformation for any rule; `ema()` and the presets build on it."""
  if ema_dtype is not None:
    try:
      dtype = jnp.dtype(ema_dtype)
    except TypeError:
      raise TypeError(f"`ema_dtype` is not a dtype: {ema_dtype!r}.") from None
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(f"`ema_dtype` must be a floating dtype, got {dtype}.")
  if overwrite_every is not None:
    overwrite_every = _check_int("ema_overwrite_frequency", overwrite_every, 1)
  rounding = _rounding.check_rounding(rounding, ema_dtype)
  first_key = _rounding.make_key(key) if rounding == "stochastic" else None
  memory_kind = _memory.check_memory_kind("memory_kind", memory_kind)

  def init_fn(params: optax.Params) -> EmaState:
    _memory.check_backend_supports(memory_kind)
    kinds = _tree.leaf_kinds(params, mask)
    leaves, treedef = jax.tree.flatten(params)
    ema: list[Any] = []
    for p, kind in zip(leaves, kinds):
      if kind is _tree.Kind.AVERAGE:
        ema.append(_copy(p, _tree.ema_dtype_for(p.dtype, ema_dtype)))
      elif kind is _tree.Kind.CARRY:
        ema.append(_copy(p))
      else:
        ema.append(None)
    return EmaState(
        count=jnp.zeros((), jnp.int32),
        ema=jax.tree.unflatten(
            treedef, [_memory.put(e, memory_kind) for e in ema]
        ),
        # float64 when x64 is on, so float64 params are debiased exactly.
        debias_norm=jnp.zeros((), jnp.result_type(float)) if debias else None,
        rounding_key=first_key,
    )

  def update_fn(
      updates: optax.Updates, state: EmaState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, EmaState]:
    flat, treedef, u_leaves, e_leaves, kinds = unpack_update(
        updates, state, params, mask, swapped=SwappedEmaState, what="EMA state"
    )
    paths = [path for path, _ in flat]
    p_leaves = [p for _, p in flat]
    _tree.check_leaves(paths, p_leaves, e_leaves, kinds, ema_dtype, "EMA state")

    active, decay = rule(state.count)
    debias_norm = state.debias_norm
    if debias_norm is not None:
      # The debiased average is itself an EMA with the decay
      # d * n_prev / n, where n = d * n_prev + (1 - d) is the weight a
      # zero-initialised average has gathered (1 - prod(d), kept accurate).
      decay = decay.astype(debias_norm.dtype)
      norm = decay * debias_norm + (1 - decay)
      decay = jnp.where(norm > 0, decay * debias_norm / norm, 1.0)
      debias_norm = jnp.where(active, norm, debias_norm)

    overwrite = None
    if overwrite_every is not None:
      overwrite = (state.count + 1) % overwrite_every == 0

    if rounding == "stochastic" and state.rounding_key is None:
      raise ValueError(
          "ema_jax: `rounding='stochastic'` needs the PRNG key that `init` "
          "puts in the state, but `state.rounding_key` is None. Re-run `init` "
          "with this transformation."
      )
    rounding_key, leaf_keys = _rounding.split(state.rounding_key, len(p_leaves))
    averaged = [i for i, kind in enumerate(kinds) if kind is _tree.Kind.AVERAGE]

    traced = isinstance(active, jax.core.Tracer)
    on_device = "device" if memory_kind else None

    def new_params() -> list[jax.Array]:
      return [_apply_update(p_leaves[i], u_leaves[i]) for i in averaged]

    # Under jit the new params are computed outside the cond, where they are
    # the value the step's `optax.apply_updates` computes anyway. Computed in
    # the branch, they kept the old params and the updates alive for it: two
    # EMA-sized temporaries and a 10x slower step with update_every=2 on CPU
    # (tests/test_performance.py). Eagerly, a skipped update computes nothing.
    outside = new_params() if traced else None

    def average(old: list[jax.Array]) -> list[jax.Array]:
      ps = outside if outside is not None else new_params()
      return [
          _memory.put(
              _average(_memory.put(e, on_device), p, None, decay, leaf_keys[i]),
              memory_kind,
          )
          for i, e, p in zip(averaged, old, ps)
      ]

    # A cond, not a select: an update that does not average (update_every > 1)
    # makes no pass over the params and the average, and moves no offloaded
    # average to the device and back. Outside jit, a Python `if` keeps the
    # update op by op (a cond would compile it, fusing `d * e + (1 - d) * p`).
    old = [e_leaves[i] for i in averaged]
    if traced:
      new_list = jax.lax.cond(active, average, list, old)
    else:
      new_list = average(old) if bool(active) else old
    new_averages = dict(zip(averaged, new_list))
    new_ema, new_updates = [], []
    for i, (p, u, kind) in enumerate(zip(p_leaves, u_leaves, kinds)):
      e = None
      if kind is _tree.Kind.AVERAGE:
        e = new_averages[i]
        if overwrite is not None and u is not None:
          e_p = _memory.put(e, on_device).astype(p.dtype)
          u = jnp.where(overwrite, (e_p - p).astype(u.dtype), u)
      elif kind is _tree.Kind.CARRY:
        e = _memory.put(_copy(_apply_update(p, u)), memory_kind)
      new_ema.append(e)
      new_updates.append(u)

    return jax.tree.unflatten(treedef, new_updates), EmaState(
        count=optax.safe_increment(state.count),
        ema=jax.tree.unflatten(treedef, new_ema),
        debias_norm=debias_norm,
        rounding_key=rounding_key,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def ema(
    decay: DecayLike = 0.999,
    *,
    start_step: int = 0,
    update_every: int = 1,
    debias: bool = False,
    ema_dtype: Any = None,
    mask: _tree.MaskOrFn = None,
    rounding: str = "nearest",
    key: jax.Array | int = 0,
    memory_kind: str | None = None,
) -> optax.GradientTransformation:
  """An exponential moving average of the parameters, kept in the optimizer state.

  Put it last in an `optax.chain`: it passes `updates` through unchanged and
  averages the parameters *after* the update, `params + updates`::

    e <- decay * e + (1 - decay) * (params + updates)

  The average starts as a copy of the params given to `init`. Read it with
  `ema_jax.ema_params(opt_state)`, or evaluate with it through `ema_jax.swap`.

  Leaves: floating leaves are averaged; integer, boolean and PRNG-key leaves
  are carried (the average holds their latest value); leaves excluded by `mask`
  are not stored at all (`None` in the average) and `swap` leaves them alone.

  Non-finite values: the average of a NaN or inf is NaN or inf, and it stays
  so while it decays (a copy, e.g. during `start_step`, clears it). Chain
  `optax.apply_if_finite` before the optimizer to skip such updates.

  Args:
    decay: the weight of the old average, a float in [0, 1] or a schedule (a
      jax-traceable callable of the step count returning a scalar, e.g.
      `ema_jax.warmup_decay(0.9999)`). The schedule's step is the number of
      updates since averaging began (0 at the first averaged update). It is
      probed at a few steps when the transformation is built. To change the
      decay during training, pass a schedule: `optax.inject_hyperparams(
      ema_jax.ema)` does not work under jit, because the options are checked
      (and `update_every` is structural) when the transformation is built.
    start_step: for the first `start_step` updates the average copies the new
      params (TensorFlow Addons' `start_step`; Keras' first step is
      `start_step=1`).
    update_every: average on every `update_every`-th update only. The decay is
      compensated (`decay ** update_every` for a constant decay; the product of
      the schedule over the skipped steps in general), so the averaging horizon
      in optimizer steps does not change. Skipped updates leave the average as
      it is.
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
      `ema_params(state, memory_kind='device')` and `swap(params, state,
      memory_kind='device')` bring it to device memory to evaluate. Commit
      the params to the device (`jax.device_put(params)`) before the first
      step: the offloaded average is committed, and uncommitted params make
      the jitted step compile a second time.

  Returns:
    An `optax.GradientTransformation` with state `EmaState`.

  Raises:
    ValueError, TypeError: when built, for a decay outside [0, 1], a schedule
      that does not return a scalar, `start_step < 0`, `update_every < 1`,
      `rounding='stochastic'` without `ema_dtype=jnp.bfloat16`, an unknown
      `memory_kind`; at `init`, for a `memory_kind` the device lacks; at
      `update`, for missing `params` or params whose structure, shapes or
      dtypes differ from the state's (the message names the leaf).

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
  schedule = as_schedule(decay)
  start_step = _check_int("start_step", start_step, 0)
  update_every = _check_int("update_every", update_every, 1)
  return make_ema(
      schedule_rule(schedule, start_step, update_every),
      debias=bool(debias),
      ema_dtype=ema_dtype,
      mask=mask,
      rounding=rounding,
      key=key,
      memory_kind=memory_kind,
  )


def moving_average(
    optimizer: optax.GradientTransformation,
    average_decay: DecayLike = 0.99,
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
  if dynamic_decay:
    if callable(average_decay):
      raise TypeError(
          "`dynamic_decay=True` needs a float `average_decay` (it caps the "
          "ramp); pass a schedule with dynamic_decay=False instead."
      )
    average_decay = _schedules.tf_dynamic_decay(average_decay)
  return optax.chain(
      optimizer, ema(average_decay, start_step=start_step, **kwargs)
  )
