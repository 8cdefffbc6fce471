"""Linen: a `TrainState` that can average its `batch_stats`, and swapping a state."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import struct
from flax.training import train_state

import ema_jax
from ema_jax import _state
from ema_jax.flax import _form
from ema_jax.flax._restore import named_leaves

# Flax's marker for params that are overwritten by their "gradient" (fp8
# scales): they have no optimizer state, so no EMA either.
_OWG = "overwrite_with_gradient"


def _no_updates(tree: Any) -> Any:
  # `None` updates leave every leaf as it is, bit for bit (`+ 0.0` would turn
  # -0.0 into 0.0), so the EMA transformation averages `tree` itself.
  return jax.tree.map(lambda _: None, tree)


class TrainState(train_state.TrainState):
  """A Flax `TrainState` with `batch_stats` and, on request, their EMA.

  `SwapEMAWeights` works with any `flax.training.train_state.TrainState`
  (subclasses included); it swaps only `params` and leaves other collections
  such as `batch_stats` alone, as Keras and TensorFlow Addons do. Use this
  class when you want the non-parameter state averaged as well (TF Model
  Garden's `trainable_weights_only=False`, timm's default): the hook then swaps
  `batch_stats` with their EMA together with the params.

  Attributes:
    batch_stats: the model's non-parameter collection(s), e.g. BatchNorm
      statistics; `None` when the model has none. Pass the new value to
      `apply_gradients(..., batch_stats=...)` as with a plain `TrainState`.
    stats_ema: the EMA state of `batch_stats` (`None` unless `average_stats`
      was given to `create`); a `SwappedEmaState` while the hook has the EMA
      swapped in.
    stats_tx: the transformation averaging `batch_stats` (static).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=False)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((4, 2)))
    >>> ema = ema_jax.ema(0.9)
    >>> state = ema_jax.flax.TrainState.create(
    ...     apply_fn=model.apply, params=variables["params"],
    ...     tx=optax.chain(optax.sgd(0.1), ema),
    ...     batch_stats=variables["batch_stats"], average_stats=ema)
    >>> def loss(params, batch_stats, x):
    ...   y, updates = model.apply({"params": params, "batch_stats": batch_stats},
    ...                            x, mutable=["batch_stats"])
    ...   return (y ** 2).mean(), updates["batch_stats"]
    >>> grads, stats = jax.grad(loss, has_aux=True)(
    ...     state.params, state.batch_stats, jnp.arange(8.0).reshape(4, 2))
    >>> state = state.apply_gradients(grads=grads, batch_stats=stats)
    >>> int(state.stats_ema.count)
    1
  """

  batch_stats: Any = None
  stats_ema: Any = None
  stats_tx: optax.GradientTransformation | None = struct.field(
      pytree_node=False, default=None
  )

  @classmethod
  def create(
      cls,
      *,
      apply_fn: Callable[..., Any],
      params: Any,
      tx: optax.GradientTransformation,
      batch_stats: Any = None,
      average_stats: optax.GradientTransformation | None = None,
      **kwargs: Any,
  ) -> "TrainState":
    """A new state at step 0, as `flax.training.train_state.TrainState.create`.

    Args:
      apply_fn: usually `model.apply`.
      params: the parameters, optimised by `tx`.
      tx: an optax transformation containing an ema_jax EMA (last in a chain).
      batch_stats: the model's non-parameter state, or `None`.
      average_stats: `None` (the default) leaves `batch_stats` out of the EMA.
        Pass an ema_jax transformation to average them too, normally the very
        `ema_jax.ema(...)` object you put in `tx`, so both follow the same
        decay schedule: the statistics' EMA steps exactly when the params'
        EMA does (see `apply_gradients`).
      **kwargs: other fields of a subclass.

    Returns:
      The state.

    Raises:
      ValueError: `average_stats` without `batch_stats`.

    Examples:
      >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
      >>> ema = ema_jax.ema(0.9)
      >>> state = ema_jax.flax.TrainState.create(
      ...     apply_fn=None, params={"w": jnp.ones(2)},
      ...     tx=optax.chain(optax.sgd(0.1), ema),
      ...     batch_stats={"mean": jnp.zeros(2)}, average_stats=ema)
      >>> state.stats_ema.ema
      {'mean': Array([0., 0.], dtype=float32)}
    """
    stats_ema = None
    if average_stats is not None:
      if batch_stats is None:
        raise ValueError(
            "`average_stats` was given but `batch_stats` is None: there is no "
            "model state to average. Pass `batch_stats=variables['batch_stats']`."
        )
      if not isinstance(average_stats, optax.GradientTransformation):
        raise TypeError(
            "`average_stats` must be an ema_jax transformation such as "
            f"`ema_jax.ema(0.999)`, got {type(average_stats).__name__}."
        )
      stats_ema = average_stats.init(batch_stats)
    return super().create(
        apply_fn=apply_fn,
        params=params,
        tx=tx,
        batch_stats=batch_stats,
        stats_ema=stats_ema,
        stats_tx=average_stats,
        **kwargs,
    )

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> "TrainState":
    """One optimizer step; then, with `average_stats`, one EMA step of `batch_stats`.

    The statistics' EMA steps only when the params' EMA did: when the `count`
    of an ema_jax EMA state in `opt_state` moved during this call. Under
    `optax.MultiSteps(..., every_k_schedule=k)` both then step once every `k`
    calls, the statistics' EMA taking the `batch_stats` of that call; the
    calls in between leave it as it was. (The choice is a `lax.cond`, so this
    works under `jit`.)

    Args:
      grads: gradients like `params`.
      **kwargs: fields to replace, usually `batch_stats=` the new statistics
        (the EMA of the statistics takes this new value).

    Returns:
      The updated state.

    Raises:
      ValueError: when the EMA is swapped in (see `SwapEMAWeights`), at
        trace time: nothing is updated.

    Examples:
      >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
      >>> ema = ema_jax.ema(0.5)
      >>> state = ema_jax.flax.TrainState.create(
      ...     apply_fn=None, params={"w": jnp.zeros(1)},
      ...     tx=optax.chain(optax.sgd(1.0), ema),
      ...     batch_stats={"mean": jnp.zeros(1)}, average_stats=ema)
      >>> state = state.apply_gradients(grads={"w": jnp.ones(1)},
      ...                               batch_stats={"mean": jnp.ones(1)})
      >>> state.stats_ema.ema  # 0.5 * 0 + 0.5 * 1
      {'mean': Array([0.5], dtype=float32)}
    """
    counts = _state.counts(self.opt_state)
    new = super().apply_gradients(grads=grads, **kwargs)
    if self.stats_tx is None:
      return new
    stats_tx = self.stats_tx

    def step(stats_ema: Any, batch_stats: Any) -> Any:
      return stats_tx.update(_no_updates(batch_stats), stats_ema, batch_stats)[1]

    stats_ema = _form.step_if_advanced(
        counts,
        _state.counts(new.opt_state),
        step,
        self.stats_ema,
        new.batch_stats,
    )
    return new.replace(stats_ema=stats_ema)


def is_train_state(x: Any) -> bool:
  return isinstance(x, train_state.TrainState)


def swapped(state: train_state.TrainState, which: int | None) -> bool:
  """Whether `state` has the EMA in `params`; checks the stats' EMA agrees."""
  result = ema_jax.is_swapped(state.opt_state, which=which)
  _form.check_same_form(result, getattr(state, "stats_ema", None), "stats_ema")
  return result


def toggle(state: Any, which: int | None, index: int | None = None) -> Any:
  """Swap the params (and the stats, when averaged) with their EMA, either way."""
  swapped(state, which)  # checks that params and stats are in the same form
  params = state.params
  owg = not isinstance(params, jax.Array) and _OWG in params
  inner = params["params"] if owg else params
  inner, opt_state = ema_jax.swap(inner, state.opt_state, which=which, index=index)
  if owg:
    params = {**params, "params": inner}
  else:
    params = inner
  changes: dict[str, Any] = {"params": params, "opt_state": opt_state}
  stats_ema = getattr(state, "stats_ema", None)
  if stats_ema is not None:
    changes["batch_stats"], changes["stats_ema"] = ema_jax.swap(
        state.batch_stats, stats_ema
    )
  return state.replace(**changes)


def layout(state: Any) -> list[tuple[str, str, Any]]:
  """(leaf name, averaged tree's leaf name, state) of what may hold EMA states;
  the optimizer state first."""
  parts = [("opt_state", "params", state.opt_state)]
  if getattr(state, "stats_ema", None) is not None:
    parts.append(("stats_ema", "batch_stats", state.stats_ema))
  return parts


def fresh_ema(state: Any) -> dict[str, Any]:
  """A new optimizer (and statistics') state for the state's params, by leaf
  name: its EMA states start as a copy of them, count 0."""
  fresh = named_leaves(state.tx.init(state.params), "opt_state")
  stats_tx = getattr(state, "stats_tx", None)
  if stats_tx is not None:
    fresh.update(named_leaves(stats_tx.init(state.batch_stats), "stats_ema"))
  return fresh
