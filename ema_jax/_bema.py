"""BEMA, the bias-corrected EMA (Block and Zhang 2025), with TRL's conventions.

The state holds three trees like the params: the EMA (`average`), the params
it started from (`origin`, the paper's `theta_0`) and the BEMA weights. The
BEMA weights sit in an `EmaState` of their own, so every helper that finds an
EMA state in an optimizer state (`ema_params`, `swap`, `blend`, the Flax hook
and `ema_weights`, the checkpoint helpers) finds them, and the state cannot be
mistaken for a plain `ema` state. The EMA is kept by the engine (one
`_engine.transformation` with BEMA's rule), which does its checks, leaf kinds,
mask, dtypes and memory placement; this module adds the `origin` snapshot and
the correction `EMA + alpha (theta_t - theta_0)`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ema_jax import _checks
from ema_jax import _engine
from ema_jax import _leaves
from ema_jax import _memory
from ema_jax._leaves import Kind, Mask
from ema_jax._memory import MemoryKind
from ema_jax._state import EmaState


class BemaState(NamedTuple):
  """State of `ema_jax.bema`.

  Attributes:
    weights: an `EmaState` whose `ema` is the BEMA weights, a tree like the
      params (floating leaves in the average's dtype: float32 for
      bfloat16/float16 params by default; integer, boolean and key leaves
      hold the latest params' values; `None` where `mask` excludes a leaf),
      and whose `count` is the number of updates seen so far (shape=(),
      int32). `ema_jax.ema_params`, `swap`, `blend` and the Flax helpers read
      and swap these weights; while they are swapped in, `weights` is a
      `SwappedEmaState`.
    average: the EMA of the params (TRL's `ema_params`), a tree like the
      params, floating leaves in the average's dtype; integer, boolean and
      key leaves hold the latest params' values; `None` where `mask`
      excludes a leaf.
    origin: the params BEMA measures the distance travelled from (the
      paper's `theta_0`): the params at `init`, or after update
      `update_after` when it is positive. Floating leaves in the average's
      dtype; `None` at every other leaf.

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> state = ema_jax.bema().init({"w": jnp.ones(2), "step": jnp.int32(0)})
    >>> state.weights.count, state.average["w"], state.origin["step"] is None
    (Array(0, dtype=int32), Array([1., 1.], dtype=float32), True)
  """

  weights: EmaState
  average: Any
  origin: Any


def _schedule_checks(
    update_freq: int,
    ema_power: float,
    bias_power: float,
    lag: float,
    update_after: int,
    multiplier: float,
    min_ema_multiplier: float,
) -> tuple[int, float, float, float, int, float, float]:
  update_freq = _checks.integer("update_freq", update_freq, 1)
  update_after = _checks.integer("update_after", update_after, 0)
  ema_power = _checks.positive_float("ema_power", ema_power, allow_zero=True)
  bias_power = _checks.positive_float("bias_power", bias_power, allow_zero=True)
  lag = _checks.positive_float("lag", lag, allow_zero=True)
  multiplier = _checks.positive_float("multiplier", multiplier)
  min_ema_multiplier = _checks.unit_float(
      "min_ema_multiplier", min_ema_multiplier,
      "It is the smallest weight the EMA gives the new params.",
  )
  # The first update that averages is at t = update_after + update_freq.
  first = lag + multiplier * (update_after + update_freq)
  if ema_power > 0 and first < 1:
    raise ValueError(
        f"`lag + multiplier * t` is {first} at the first BEMA update (t = "
        f"{update_after + update_freq}), below 1: the EMA's weight "
        f"`(lag + multiplier * t) ** -ema_power` would exceed 1 and the EMA "
        "would overshoot the params. Raise `lag` (TRL's default is 10) or "
        "`multiplier`."
    )
  return (update_freq, ema_power, bias_power, lag, update_after, multiplier,
          min_ema_multiplier)


def bias_corrected(
    average: jax.Array, p: jax.Array, origin: jax.Array, alpha: jax.Array
) -> jax.Array:
  """BEMA's weights for one leaf: `average + alpha (p - origin)`, in float32
  or wider, in the average's dtype."""
  compute = _leaves.compute_dtype(average.dtype)
  a, pf, o = average.astype(compute), p.astype(compute), origin.astype(compute)
  return (a + alpha.astype(compute) * (pf - o)).astype(average.dtype)


def bema(
    update_freq: int = 400,
    ema_power: float = 0.5,
    bias_power: float = 0.2,
    lag: float = 10,
    update_after: int = 0,
    multiplier: float = 1.0,
    min_ema_multiplier: float = 0.0,
    *,
    ema_dtype: Any = None,
    mask: Mask = None,
    memory_kind: MemoryKind = None,
) -> optax.GradientTransformation:
  """BEMA, the bias-corrected EMA, with TRL's `BEMACallback` arguments and numbers.

  Put it last in an `optax.chain`, like `ema_jax.ema`. After optimizer update
  `t` (TRL's `global_step`; the state's count is `t - 1` before it), with
  `theta_t` the params after that update:

  * `t < update_after`: nothing changes;
  * `t == update_after`: `theta_0` and the EMA are set to `theta_t`;
  * otherwise, when `(t - update_after) % update_freq == 0`, with
    `s = lag + multiplier * t`: `beta = max(s ** -ema_power,
    min_ema_multiplier)`, `alpha = s ** -bias_power`,
    `EMA <- (1 - beta) EMA + beta theta_t` and the BEMA weights
    `<- EMA + alpha (theta_t - theta_0)`.

  `theta_0`, the EMA and the BEMA weights start as copies of the params given
  to `init`, and the BEMA weights keep their last value between updates (so
  with the defaults they are the initial params for the first 399 updates,
  as in TRL). `ema_power=0` makes the EMA the latest params; `bias_power=0`
  gives `alpha = 1`. Read the BEMA weights with `ema_jax.ema_params(state)`,
  evaluate with them through `ema_jax.swap` (exact, and twice is the
  identity) or the Flax hook, and write them into a reference model with
  `ema_jax.blend(params, state, 1.0)` or `ema_params`. `ema_jax.reset`
  replaces the BEMA weights only (they are recomputed at the next update);
  to restart BEMA, call `init` again.

  The paper's code (abblock/bema) uses another convention; see
  docs/teachers.md.

  Args:
    update_freq: update the BEMA weights every `update_freq` optimizer
      updates after `update_after` (TRL's `update_freq`, the paper's `phi`).
    ema_power: the EMA's power `kappa`, >= 0 (0: no EMA).
    bias_power: the correction's power `eta`, >= 0 (0: `alpha = 1`).
    lag: the offset `rho`, >= 0.
    update_after: the burn-in `tau`: `theta_0` is the params after update
      `update_after` (the initial params when 0).
    multiplier: the step scale `gamma`, positive.
    min_ema_multiplier: the smallest EMA weight `beta`, in [0, 1].
    ema_dtype: the dtype of the three buffers, as in `ema_jax.ema` (float32
      for bfloat16/float16 params by default).
    mask: which floating leaves to keep BEMA for, as in `ema_jax.ema`.
    memory_kind: where the three buffers live, as in `ema_jax.ema`.

  Returns:
    An `optax.GradientTransformation` whose state is a `BemaState`.

  Raises:
    ValueError: an argument out of range, or `lag + multiplier * t` below 1
      at the first update with `ema_power > 0` (the EMA's weight would exceed
      1).
    TypeError: an argument of the wrong type.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.bema(update_freq=1, lag=1))
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([-4.0]), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> # t = 1, s = 2: EMA = 4 / sqrt(2), weights = EMA + 2 ** -0.2 * 4
    >>> ema_jax.ema_params(state)
    Array([6.3106294], dtype=float32)

  References:
    Block and Zhang, "EMA Without the Lag: Bias-Corrected Iterate Averaging
    Schemes", arXiv 2508.00180 (2025); TRL's `trl.BEMACallback`.
  """
  (update_freq, ema_power, bias_power, lag, update_after, multiplier,
   min_ema_multiplier) = _schedule_checks(
       update_freq, ema_power, bias_power, lag, update_after, multiplier,
       min_ema_multiplier,
   )
  dtype = jnp.result_type(float)

  def phase(count: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """At update `t = count + 1`: is it the snapshot, an update, and `s`."""
    t = count + 1
    snapshot = t == update_after
    due = (t > update_after) & ((t - update_after) % update_freq == 0)
    return snapshot, due, lag + multiplier * t.astype(dtype)

  def rule(count: jax.Array) -> _engine.Step:
    snapshot, due, s = phase(count)
    beta = jnp.maximum(s ** -ema_power, min_ema_multiplier)
    return _engine.Step(snapshot | due, jnp.where(snapshot, 1.0, beta).astype(dtype))

  # The EMA is an engine average with BEMA's rule: its checks, leaf kinds,
  # mask, dtypes, placement and skipped updates.
  average_tx = _engine.transformation(
      rule, None, ema_dtype=ema_dtype, mask=mask, memory_kind=memory_kind
  )

  def init_fn(params: optax.Params) -> BemaState:
    start = average_tx.init(params)
    kinds = _leaves.leaf_kinds(params, mask)
    treedef = jax.tree.structure(params)
    weights, origin = [], []
    for e, kind in zip(_leaves.flatten_like(treedef, start.ema, "EMA"), kinds):
      # Copies of the engine's start (the params in the average's dtype),
      # placed as the engine places them (carried leaves where the params are).
      weights.append(None if e is None else _memory.same_memory_as(_engine.copy(e), e))
      origin.append(
          _memory.same_memory_as(_engine.copy(e), e) if kind is Kind.AVERAGE else None
      )
    return BemaState(
        weights=EmaState(start.count, jax.tree.unflatten(treedef, weights)),
        average=start.ema,
        origin=jax.tree.unflatten(treedef, origin),
    )

  def update_fn(
      updates: optax.Updates, state: BemaState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, BemaState]:
    if not isinstance(state, BemaState):
      raise TypeError(
          "This transformation keeps a BemaState, but `update` got a "
          f"{type(state).__name__}. Pass the state its own `init` returned."
      )
    _checks.not_swapped(state.weights, "`update`")
    count = state.weights.count
    updates, average = average_tx.update(updates, EmaState(count, state.average), params)

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    u_leaves = _leaves.flatten_like(treedef, updates, "updates")
    kinds = _leaves.leaf_kinds(params, mask)
    trees = [
        _leaves.flatten_like(treedef, tree, "BEMA state")
        for tree in (state.weights.ema, state.origin, average.ema)
    ]
    w_leaves, o_leaves, a_leaves = trees
    for (path, p), kind, w, o, a in zip(flat, kinds, *trees):
      # The engine has checked the EMA against the params; the BEMA weights
      # and `origin` must match it, leaf for leaf.
      like = None if a is None else _leaves.leaf_dtype(a)
      _leaves.check_stored(path, p, w, kind, "BEMA weights", dtype=like)
      _leaves.check_stored(
          path, p, o, Kind.AVERAGE if kind is Kind.AVERAGE else Kind.SKIP,
          "BEMA origin", dtype=like,
      )
    averaged = [i for i, kind in enumerate(kinds) if kind is Kind.AVERAGE]
    snapshot, due, s = phase(count)
    alpha = s ** -bias_power
    traced = isinstance(due, jax.core.Tracer)
    on_device = "device" if memory_kind else None

    def new_params() -> list[jax.Array]:
      return _engine.apply_updates(
          [flat[i][1] for i in averaged], [u_leaves[i] for i in averaged]
      )

    # As in the engine: under jit the new params are computed outside the
    # branches (the step computes them anyway), not kept alive into them.
    outside = new_params() if traced else None

    def take_origin(old: tuple[list[Any], list[Any]]) -> tuple[list[Any], list[Any]]:
      ps = outside if outside is not None else new_params()
      origin = [
          _memory.put(_engine.copy(p, _leaves.leaf_dtype(o)), memory_kind)
          for p, o in zip(ps, old[1])
      ]
      return old[0], origin

    def correct(old: tuple[list[Any], list[Any]]) -> tuple[list[Any], list[Any]]:
      ps = outside if outside is not None else new_params()
      weights = [
          _memory.put(
              bias_corrected(
                  _memory.put(a_leaves[i], on_device), p,
                  _memory.put(o, on_device), alpha,
              ),
              memory_kind,
          )
          for i, p, o in zip(averaged, ps, old[1])
      ]
      return weights, old[1]

    old = ([w_leaves[i] for i in averaged], [o_leaves[i] for i in averaged])
    if traced:
      branch = jnp.where(snapshot, 1, jnp.where(due, 2, 0))
      new_w, new_o = jax.lax.switch(branch, [tuple, take_origin, correct], old)
    elif bool(snapshot):
      new_w, new_o = take_origin(old)
    elif bool(due):
      new_w, new_o = correct(old)
    else:
      new_w, new_o = old
    by_index = dict(zip(averaged, zip(new_w, new_o)))
    weights, origin = [], []
    for i, kind in enumerate(kinds):
      w, o = w_leaves[i], o_leaves[i]
      if kind is Kind.AVERAGE:
        w, o = by_index[i]
      elif kind is Kind.CARRY:
        # The latest value, as the engine carries it (a buffer of its own).
        w = _engine.copy(a_leaves[i])
      weights.append(w)
      origin.append(o)
    return updates, BemaState(
        weights=EmaState(average.count, jax.tree.unflatten(treedef, weights)),
        average=average.ema,
        origin=jax.tree.unflatten(treedef, origin),
    )

  return optax.GradientTransformation(init_fn, update_fn)
