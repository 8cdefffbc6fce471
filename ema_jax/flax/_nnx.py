"""NNX: the EMA of non-parameter state, and swapping a model with its EMA in place."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from flax.nnx.training.optimizer import to_opt_state

import ema_jax
from ema_jax.flax import _form


def _graph_kw(holder: Any) -> dict[str, Any]:
  # Follow the holder's graph/tree mode where this Flax version has one.
  graph = getattr(holder, "graph", None)
  return {} if graph is None else {"graph": graph}


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


class StatsEMA(nnx.Pytree):
  """The EMA of an NNX model's non-parameter state (`nnx.BatchStat` by default).

  `nnx.Optimizer(model, tx, wrt=nnx.Param)` averages only parameters, as
  Keras and TensorFlow Addons do. To average BatchNorm statistics as well (TF
  Model Garden's `trainable_weights_only=False`, timm's default), keep one of
  these next to the optimizer, call `update(model)` after each
  `optimizer.update`, and hand it to `SwapEMAWeights` / `ema_weights` as
  `stats`, which then swap the statistics together with the params.

  Attributes:
    tx: the EMA transformation (normally the `ema_jax.ema(...)` in the
      optimizer's chain, so both follow the same schedule).
    wrt: the filter of the variables averaged.
    opt_state: its state, an `EmaState` (`SwappedEmaState` while swapped in).

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax import nnx
    >>> model = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    >>> stats = ema_jax.flax.StatsEMA(model, ema_jax.ema(0.5))
    >>> _ = model(jnp.array([[2.0, 4.0], [4.0, 8.0]]))  # moves the running mean
    >>> model.mean[...]
    Array([0.03, 0.06], dtype=float32)
    >>> stats.update(model)
    >>> stats.opt_state.ema["mean"][...]  # 0.5 * 0 + 0.5 * new mean
    Array([0.015, 0.03 ], dtype=float32)
  """

  def __init__(
      self,
      model: nnx.Module,
      tx: optax.GradientTransformation,
      *,
      wrt: Any = nnx.BatchStat,
  ):
    if not isinstance(tx, optax.GradientTransformation):
      raise TypeError(
          "`tx` must be an ema_jax transformation such as `ema_jax.ema(0.999)`, "
          f"got {type(tx).__name__}."
      )
    self.tx = tx
    self.wrt = wrt
    self.opt_state = nnx.data(to_opt_state(tx.init(nnx.state(model, wrt))))

  def update(self, model: nnx.Module) -> None:
    """Average the model's current `wrt` variables into the EMA (in place).

    Args:
      model: the model whose statistics are averaged (the one given at
        construction).

    Raises:
      RuntimeError: while the EMA is swapped in.

    Examples:
      >>> import jax.numpy as jnp, ema_jax, ema_jax.flax
      >>> from flax import nnx
      >>> model = nnx.BatchNorm(1, rngs=nnx.Rngs(0))
      >>> stats = ema_jax.flax.StatsEMA(model, ema_jax.ema(0.0))
      >>> model.var[...] = jnp.array([3.0])
      >>> stats.update(model)
      >>> stats.opt_state.ema["var"][...]
      Array([3.], dtype=float32)
    """
    current = nnx.as_pure(nnx.state(model, self.wrt))
    _, new_state = self.tx.update(
        jax.tree.map(lambda _: None, current), nnx.as_pure(self.opt_state), current
    )
    nnx.update(self.opt_state, nnx.state(new_state))


def swapped(optimizer: Any, stats: StatsEMA | None, which: int | None) -> bool:
  """Whether the model has the EMA in; checks that `stats` agrees."""
  if not hasattr(optimizer, "opt_state") or not hasattr(optimizer, "wrt"):
    raise TypeError(
        "`optimizer` must be an `nnx.Optimizer(model, tx, wrt=...)` whose `tx` "
        f"holds an ema_jax EMA, got {type(optimizer).__name__}."
    )
  result = _form.opt_state_swapped(optimizer.opt_state, which)
  if stats is not None:
    if not isinstance(stats, StatsEMA):
      raise TypeError(
          f"`stats` must be an `ema_jax.flax.StatsEMA`, got {type(stats).__name__}."
      )
    _form.check_same_form(result, stats.opt_state, "stats.opt_state")
  return result


def _plan(model: nnx.Module, holder: Any, which: int | None) -> tuple[Any, Any]:
  """Compute one holder's swap without changing anything yet."""
  current = nnx.as_pure(nnx.state(model, holder.wrt, **_graph_kw(holder)))
  new_values, new_state = ema_jax.swap(
      current, nnx.as_pure(holder.opt_state), which=which
  )
  return new_values, new_state


def _commit(model: nnx.Module, holder: Any, new_values: Any, new_state: Any) -> None:
  # The state's Variables are kept (their metadata, e.g. sharding, too): only
  # their values move, and the container is rebuilt with the other NamedTuple
  # type, so a round trip leaves the graph as it was (no recompilation).
  variables = jax.tree.leaves(holder.opt_state, is_leaf=_is_variable)
  leaves, treedef = jax.tree.flatten(new_state)
  treedef_: Any = treedef
  if len(variables) != len(leaves) or not all(map(_is_variable, variables)):
    raise RuntimeError(
        "ema_jax.flax: the optimizer state does not hold one Variable per "
        "array; was it built by `nnx.Optimizer`?"
    )
  for variable, leaf in zip(variables, leaves):
    variable.set_value(leaf)
  holder.opt_state = nnx.data(treedef_.unflatten(variables))
  nnx.update(model, new_values)


def toggle(
    model: nnx.Module, optimizer: Any, stats: StatsEMA | None, which: int | None
) -> None:
  """Swap the model's params (and stats) with their EMA in place, either way."""
  swapped(optimizer, stats, which)
  # Every swap is computed before anything changes: an error leaves the model,
  # the optimizer and the stats as they were.
  plans = [(optimizer, _plan(model, optimizer, which))]
  if stats is not None:
    plans.append((stats, _plan(model, stats, None)))
  for holder, (values, state) in plans:
    _commit(model, holder, values, state)
