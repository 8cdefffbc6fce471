"""NNX: an optimizer that can average BatchStat too, and swapping a model in place."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax
from flax import nnx
from flax.nnx import filterlib
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
      ValueError: while the EMA is swapped in, at trace time (under
        `nnx.jit` and `nnx.cached_partial` too): nothing is updated.

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


def _is_state_or_variable(x: Any) -> bool:
  return _state.is_state(x) or isinstance(x, nnx.Variable)


class _Located(NamedTuple):
  """The optimizer state cut at its Variables and EMA states, read once."""

  leaves: list[Any]  # Variables, and EMA states (holding Variables)
  treedef: Any
  position: int  # of the EMA state in `leaves`

  @property
  def state(self) -> Any:
    return self.leaves[self.position]


def _locate(optimizer: Any, which: int | None) -> _Located:
  # The walk stops at every Variable: Adam's moments and the rest of the
  # optimizer state are neither read nor rewritten, only the EMA state is.
  opt_state = optimizer.opt_state
  leaves, treedef = jax.tree.flatten(opt_state, is_leaf=_is_state_or_variable)
  found = [i for i, x in enumerate(leaves) if _state.is_state(x)]
  if which is None and len(found) == 1:
    return _Located(leaves, treedef, found[0])
  if type(which) is int and 0 <= which < len(found):
    return _Located(leaves, treedef, found[which])
  _state.find(opt_state, which)  # raises the error that names the problem
  raise AssertionError("unreachable: `find` accepted what `_locate` refused")


def _current_form(optimizer: Any, which: int | None) -> tuple[_Located, bool]:
  """The EMA state and whether it is swapped in; checks the statistics agree."""
  _check_optimizer(optimizer)
  located = _locate(optimizer, which)
  result = isinstance(located.state, _state.SWAPPED_TYPES)
  stats_ema, _ = _stats_parts(optimizer)
  if stats_ema is not None:
    _form.check_same_form(result, stats_ema, "optimizer.stats_ema")
  return located, result


def swapped(optimizer: Any, which: int | None) -> bool:
  """Whether the model has the EMA in; checks the statistics' EMA agrees."""
  return _current_form(optimizer, which)[1]


class _Plan(NamedTuple):
  """One swap, computed before anything changes."""

  variables: list[Any]  # the model's own Variables, in `values` order
  values: list[Any]
  old_state: Any  # holding Variables
  new_state: Any  # pure


def _plan(
    model: nnx.Module,
    optimizer: Any,
    wrt: Any,
    state: Any,
    index: int | None = None,
) -> _Plan:
  # The model's own Variables are read once, and the swapped values written
  # into them directly, with no second walk of the model. A model whose
  # pytree holds its `wrt` Variables once each is read as a pytree (about a
  # fifth of `nnx.state`'s graph walk); any other, or one that does not match
  # the EMA that way, through `nnx.state`, which also raises the errors.
  _, pure_state = _pure(state)
  by_pytree = _pytree_state(model, wrt)
  if by_pytree is not None:
    variables, pure_current = _pure(by_pytree)
    try:
      values, new_state = ema_jax.swap(pure_current, pure_state, index=index)
    except ValueError:
      pass
    else:
      return _Plan(variables, jax.tree.leaves(values), state, new_state)
  current = nnx.state(model, wrt, **_graph_kw(optimizer))
  variables, pure_current = _pure(current)
  values, new_state = ema_jax.swap(pure_current, pure_state, index=index)
  return _Plan(variables, jax.tree.leaves(values), state, new_state)


def _path_key(key: Any) -> Any:
  for name in ("name", "idx", "key"):  # GetAttrKey, SequenceKey, DictKey
    if hasattr(key, name):
      return getattr(key, name)
  raise TypeError(f"unexpected pytree key {key!r}")


def _pytree_state(model: nnx.Module, wrt: Any) -> Any:
  """`nnx.state(model, wrt)` read as a pytree, or `None` where that is not the
  same (a Variable held twice: `nnx.state` keeps one; a model that is no
  pytree)."""
  try:
    flat, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_variable)
    predicate = filterlib.to_predicate(wrt)
    found = {}
    for path, leaf in flat:
      if _is_variable(leaf):
        keys = tuple(_path_key(k) for k in path)
        if predicate(keys, leaf):
          found[keys] = leaf
  except (TypeError, RecursionError):  # not a pytree, or a cycle in the graph
    return None
  if len({id(v) for v in found.values()}) != len(found):
    return None
  return nnx.State.from_flat_path(found)


_ARRAY = type(jax.numpy.zeros(()))


def _pure(tree: Any) -> tuple[list[Any], Any]:
  """The tree's Variables, and `nnx.as_pure(tree)`: a quick path for Variables
  holding plain device arrays (no per-leaf type checks), `as_pure` otherwise."""
  variables, treedef = jax.tree.flatten(tree, is_leaf=_is_variable)
  raw = [v.get_raw_value() if _is_variable(v) else v for v in variables]
  if all(type(x) is _ARRAY for x in raw):
    return variables, jax.tree.unflatten(treedef, raw)
  return variables, nnx.as_pure(tree)


def _set_data(holder: Any, name: str, value: Any) -> None:
  """`holder.<name> = nnx.data(value)` for an attribute that is data already.

  `Pytree.__setattr__` checks every leaf of the new value for data/static
  status: for `opt_state` that walks the whole optimizer state, Adam's
  moments included, at every swap, though only the EMA's part changed and
  the attribute's status cannot. Where this Flax keeps that status where we
  can read it, the check is skipped; otherwise the public path runs.
  """
  nodes = getattr(holder, "_pytree__nodes", None)
  if nodes is not None and nodes.get(name) is True:
    object.__setattr__(holder, name, value)
  else:
    setattr(holder, name, nnx.data(value))


def _rebuilt(state: Any, new_state: Any) -> Any:
  # The state's Variables are kept (their metadata, e.g. sharding, too), field
  # by field, and the container is rebuilt with the other NamedTuple type, so
  # a round trip leaves the graph as it was (no recompilation). A field only
  # one form has (`raw_params`, a multi-EMA's `index`) gets fresh
  # optimizer-state Variables; the arrays that did not move (`count`, the
  # average) are not written at all.
  fields = {}
  for name, new in zip(new_state._fields, new_state):
    old = getattr(state, name) if name in state._fields else None
    old_def: Any
    variables, old_def = jax.tree.flatten(old, is_leaf=_is_variable)
    leaves, new_def = jax.tree.flatten(new)
    if not all(map(_is_variable, variables)):
      raise RuntimeError(
          "ema_jax.flax: the optimizer state does not hold one Variable per "
          "array; was it built by `nnx.Optimizer`?"
      )
    if old is None or old_def != new_def:
      fields[name] = to_opt_state(new)
      continue
    for variable, leaf in zip(variables, leaves):
      if variable.get_raw_value() is not leaf:
        variable.set_value(leaf)
    fields[name] = jax.tree.unflatten(new_def, variables)
  return type(new_state)(**fields)


def _commit(plan: _Plan) -> Any:
  """Write the swapped values into the model; the new EMA state to hold."""
  state = _rebuilt(plan.old_state, plan.new_state)
  for variable, value in zip(plan.variables, plan.values):
    if variable.get_raw_value() is not value:  # leaves the EMA skips stay
      variable.set_value(value)
  return state


def set_form(
    model: nnx.Module,
    optimizer: Any,
    which: int | None,
    ema_in: bool,
    index: int | None = None,
) -> bool:
  """Put the EMA (`ema_in=True`) or the raw weights into the model in place.

  Nothing happens if they are there already. Returns whether the EMA was in
  before the call. The form is decided once, from the EMA state's type; only
  the EMA's part of the optimizer state is read and written.
  """
  located, was_in = _current_form(optimizer, which)
  if was_in == ema_in:
    return was_in
  stats_ema, stats_wrt = _stats_parts(optimizer)
  # Every swap is computed before anything changes: an error (say, a model
  # that does not match the optimizer) leaves everything as it was.
  params = _plan(model, optimizer, optimizer.wrt, located.state, index)
  if stats_ema is not None:
    stats = _plan(model, optimizer, stats_wrt, stats_ema)
  leaves = list(located.leaves)
  leaves[located.position] = _commit(params)
  _set_data(optimizer, "opt_state", located.treedef.unflatten(leaves))
  if stats_ema is not None:
    _set_data(optimizer, "stats_ema", _commit(stats))
  return was_in


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
