"""NNX: an optimizer that can average BatchStat too, and swapping a model in place."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from flax.nnx.training.optimizer import to_opt_state

import ema_jax
from ema_jax import _state
from ema_jax.flax import _form
from ema_jax.flax._restore import named_leaves


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _graph_kw(optimizer: Any) -> dict[str, Any]:
  # Follow the optimizer's graph/tree mode where this Flax version has one.
  graph = getattr(optimizer, "graph", None)
  return {} if graph is None else {"graph": graph}


class Optimizer(nnx.Optimizer):
  """`nnx.Optimizer` that can also keep the EMA of non-parameter state.

  `SwapEMAWeights` works with any `nnx.Optimizer(model, tx, wrt=nnx.Param)`
  whose `tx` holds an ema_jax EMA; it swaps only the parameters and leaves
  `nnx.BatchStat` (and RNG state) alone, as Keras and TensorFlow Addons do.
  Use this subclass when you want the BatchNorm statistics averaged as well
  (TF Model Garden's `trainable_weights_only=False`, timm's default): each
  `update` then also averages the model's current `stats_wrt` variables, and
  the hook swaps them together with the params.

  Attributes:
    stats_tx: the transformation averaging the statistics, or `None` (static).
    stats_wrt: the filter of the averaged non-parameter variables.
    stats_ema: its state, an `EmaState` (a `SwappedEmaState` while the EMA is
      swapped in), or `None`.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
    >>> ema = ema_jax.ema(0.5)
    >>> optimizer = ema_jax.flax.Optimizer(
    ...     model, optax.chain(optax.sgd(0.1), ema), wrt=nnx.Param, average_stats=ema)
    >>> grads = nnx.grad(lambda m: (m(jnp.eye(2)) ** 2).mean())(model)
    >>> _ = optimizer.update(model, grads)
    >>> mean = model.layers[1].mean[...]  # moved from 0 by the forward pass
    >>> averaged = optimizer.stats_ema.ema["layers"][1]["mean"][...]
    >>> bool(jnp.all(averaged == 0.5 * mean))  # 0.5 * 0 + 0.5 * mean
    True
  """

  def __init__(
      self,
      model: nnx.Module,
      tx: optax.GradientTransformation,
      *,
      wrt: Any,
      average_stats: optax.GradientTransformation | None = None,
      stats_wrt: Any = nnx.BatchStat,
      **kwargs: Any,
  ):
    """Set up the optimizer, and the statistics' EMA if asked.

    Args:
      model: the NNX model.
      tx: an optax transformation holding an ema_jax EMA (last in a chain).
      wrt: the trained variables, as for `nnx.Optimizer` (e.g. `nnx.Param`).
      average_stats: `None` (the default) leaves the statistics out of the
        EMA; an ema_jax transformation averages them, normally the very
        `ema_jax.ema(...)` object in `tx`, so both follow the same schedule:
        the statistics' EMA steps exactly when the params' EMA does (see
        `update`).
      stats_wrt: which non-parameter variables to average.
      **kwargs: passed to `nnx.Optimizer`.
    """
    super().__init__(model, tx, wrt=wrt, **kwargs)
    if average_stats is not None and not isinstance(
        average_stats, optax.GradientTransformation
    ):
      raise TypeError(
          "`average_stats` must be an ema_jax transformation such as "
          f"`ema_jax.ema(0.999)`, got {type(average_stats).__name__}."
      )
    self.stats_tx = average_stats
    self.stats_wrt = stats_wrt
    stats_ema = None
    if average_stats is not None:
      stats = nnx.state(model, stats_wrt, **_graph_kw(self))
      if not jax.tree.leaves(stats):
        raise ValueError(
            "`average_stats` was given but the model has no variables matching "
            f"`stats_wrt={stats_wrt!r}`: there is nothing to average."
        )
      stats_ema = to_opt_state(average_stats.init(stats))
    self.stats_ema = nnx.data(stats_ema)

  def update(self, model: nnx.Module, grads: Any, /, **kwargs: Any) -> optax.Updates:
    """`nnx.Optimizer.update`, then one EMA step of the statistics if averaged.

    The statistics are read from `model` as they are now, i.e. after the
    forward pass of this step moved them. Their EMA steps only when the
    params' EMA did: when the `count` of an ema_jax EMA state in `opt_state`
    moved during this call. Under `optax.MultiSteps(..., every_k_schedule=k)`
    both then step once every `k` calls; the calls in between leave the
    statistics' EMA as it was. (The choice is a `lax.cond`, so this works
    under `nnx.jit`.)

    Args:
      model: the model (updated in place).
      grads: the gradients, as for `nnx.Optimizer.update`.
      **kwargs: passed to the transformation.

    Returns:
      The updates applied to the params.

    Raises:
      RuntimeError: while the EMA is swapped in.

    Examples:
      >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
      >>> from flax import nnx
      >>> model = nnx.BatchNorm(1, use_bias=False, use_scale=False, rngs=nnx.Rngs(0))
      >>> ema = ema_jax.ema(0.0)
      >>> optimizer = ema_jax.flax.Optimizer(
      ...     model, optax.chain(optax.sgd(0.1), ema), wrt=nnx.Param, average_stats=ema)
      >>> model.var[...] = jnp.array([3.0])
      >>> _ = optimizer.update(model, nnx.state(model, nnx.Param))
      >>> optimizer.stats_ema.ema["var"][...]
      Array([3.], dtype=float32)
    """
    counts = _state.counts(nnx.as_pure(self.opt_state))
    updates = super().update(model, grads, **kwargs)
    if self.stats_tx is not None:
      stats_tx = self.stats_tx
      current = nnx.as_pure(nnx.state(model, self.stats_wrt, **_graph_kw(self)))

      def step(stats_ema: Any, stats: Any) -> Any:
        # `None` updates leave each statistic as it is, bit for bit.
        no_updates = jax.tree.map(lambda _: None, stats)
        return stats_tx.update(no_updates, stats_ema, stats)[1]

      new_state = _form.step_if_advanced(
          counts,
          _state.counts(nnx.as_pure(self.opt_state)),
          step,
          nnx.as_pure(self.stats_ema),
          current,
      )
      nnx.update(self.stats_ema, nnx.state(new_state, **_graph_kw(self)))
    return updates


def _check_optimizer(optimizer: Any) -> None:
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        "`optimizer` must be an `nnx.Optimizer(model, tx, wrt=...)` whose `tx` "
        f"holds an ema_jax EMA, got {type(optimizer).__name__}."
    )


def _stats_parts(optimizer: Any) -> tuple[Any, Any]:
  return getattr(optimizer, "stats_ema", None), getattr(optimizer, "stats_wrt", None)


def swapped(optimizer: Any, which: int | None) -> bool:
  """Whether the model has the EMA in; checks the statistics' EMA agrees."""
  _check_optimizer(optimizer)
  result = ema_jax.is_swapped(optimizer.opt_state, which=which)
  stats_ema, _ = _stats_parts(optimizer)
  if stats_ema is not None:
    _form.check_same_form(result, stats_ema, "optimizer.stats_ema")
  return result


def _plan(
    model: nnx.Module,
    optimizer: Any,
    wrt: Any,
    state: Any,
    which: int | None,
    index: int | None = None,
) -> tuple[Any, Any]:
  current = nnx.as_pure(nnx.state(model, wrt, **_graph_kw(optimizer)))
  return ema_jax.swap(current, nnx.as_pure(state), which=which, index=index)


def _rebuilt(state: Any, new_state: Any) -> Any:
  # The state's Variables are kept (their metadata, e.g. sharding, too): only
  # their values move, and the container is rebuilt with the other NamedTuple
  # type, so a round trip leaves the graph as it was (no recompilation).
  variables = jax.tree.leaves(state, is_leaf=_is_variable)
  leaves, treedef = jax.tree.flatten(new_state)
  treedef_: Any = treedef
  if not all(map(_is_variable, variables)):
    raise RuntimeError(
        "ema_jax.flax: the optimizer state does not hold one Variable per "
        "array; was it built by `nnx.Optimizer`?"
    )
  if len(variables) != len(leaves):
    return _rebuilt_by_path(state, new_state)
  for variable, leaf in zip(variables, leaves):
    variable.set_value(leaf)
  return treedef_.unflatten(variables)


def _rebuilt_by_path(state: Any, new_state: Any) -> Any:
  # A multi-EMA state gains leaves when swapped (`raw_params`, `index`) and
  # loses them when swapped back. Leaves at the same path (`count`, `ema`)
  # keep their Variables, so swapping back restores the original graph; the
  # extra leaves get fresh optimizer-state Variables.
  flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)
  by_path = {jax.tree_util.keystr(path): v for path, v in flat}
  new_flat, treedef = jax.tree_util.tree_flatten_with_path(new_state)
  out = []
  for path, leaf in new_flat:
    variable = by_path.get(jax.tree_util.keystr(path))
    if variable is None:
      variable = to_opt_state(leaf)
    else:
      variable.set_value(leaf)
    out.append(variable)
  return jax.tree.unflatten(treedef, out)


def toggle(
    model: nnx.Module, optimizer: Any, which: int | None, index: int | None = None
) -> None:
  """Swap the model's params (and averaged stats) with their EMA in place."""
  swapped(optimizer, which)
  stats_ema, stats_wrt = _stats_parts(optimizer)
  # Every swap is computed before anything changes: an error (say, a model
  # that does not match the optimizer) leaves everything as it was.
  values, state = _plan(
      model, optimizer, optimizer.wrt, optimizer.opt_state, which, index
  )
  if stats_ema is not None:
    stats_values, new_stats = _plan(model, optimizer, stats_wrt, stats_ema, None)
  optimizer.opt_state = nnx.data(_rebuilt(optimizer.opt_state, state))
  nnx.update(model, values)
  if stats_ema is not None:
    optimizer.stats_ema = nnx.data(_rebuilt(stats_ema, new_stats))
    nnx.update(model, stats_values)


def layout(optimizer: Any) -> list[tuple[str, str, Any]]:
  """(leaf name, averaged tree's leaf name, state) of what may hold EMA states
  in `{"model": ..., "optimizer": ...}`; the optimizer state first."""
  parts = [("optimizer.opt_state", "model", nnx.as_pure(optimizer.opt_state))]
  stats_ema, _ = _stats_parts(optimizer)
  if stats_ema is not None:
    parts.append(("optimizer.stats_ema", "model", nnx.as_pure(stats_ema)))
  return parts


def fresh_ema(model: nnx.Module, optimizer: Any) -> dict[str, Any]:
  """A new optimizer (and statistics') state for the model's current values,
  by leaf name: its EMA states start as a copy of them, count 0."""
  def pure(wrt: Any) -> Any:
    return nnx.as_pure(nnx.state(model, wrt, **_graph_kw(optimizer)))

  fresh = named_leaves(
      optimizer.tx.init(pure(optimizer.wrt)), "optimizer.opt_state", ".value"
  )
  stats_tx = getattr(optimizer, "stats_tx", None)
  if stats_tx is not None:
    _, stats_wrt = _stats_parts(optimizer)
    fresh.update(named_leaves(
        stats_tx.init(pure(stats_wrt)), "optimizer.stats_ema", ".value"
    ))
  return fresh
