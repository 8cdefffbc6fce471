"""Reading the EMA out of an optimizer state, and swapping it with the params."""

from __future__ import annotations

import itertools
from typing import Any

import jax
import optax

from ema_jax import _memory
from ema_jax import _multi
from ema_jax import _swap_check
from ema_jax import _tree
from ema_jax._state import EmaState, SwappedEmaState, is_ema_state


def _is_state(x: Any) -> bool:
  return is_ema_state(x) or _multi.is_multi_state(x)


def _find(state: Any, which: int | None) -> tuple[int, Any]:
  found = [
      (path, s)
      for path, s in jax.tree_util.tree_flatten_with_path(
          state, is_leaf=_is_state
      )[0]
      if _is_state(s)
  ]
  if not found:
    raise ValueError(
        "No ema_jax EMA state found in `state`. Pass the optimizer state of a "
        "transformation that contains `ema_jax.ema()` (put it last in your "
        "optax.chain) or a preset."
    )
  if which is None:
    if len(found) > 1:
      places = ", ".join(_tree.path_str(path) for path, _ in found)
      raise ValueError(
          f"`state` holds {len(found)} EMA states (at {places}); pass "
          "`which=i` to pick the i-th, counting from 0 in that order."
      )
    which = 0
  if not 0 <= which < len(found):
    raise ValueError(
        f"`which={which}` is out of range: `state` holds {len(found)} EMA "
        "state(s)."
    )
  return which, found[which][1]


def _replace(state: Any, which: int, new: Any) -> Any:
  if _is_state(state):
    return new
  seen = itertools.count()

  def pick(x: Any) -> Any:
    return new if _is_state(x) and next(seen) == which else x

  return jax.tree.map(pick, state, is_leaf=_is_state)


def ema_params(
    state: optax.OptState,
    index: int | None = None,
    *,
    which: int | None = None,
    memory_kind: str | None = None,
) -> optax.Params:
  """The EMA of the params, from an `EmaState` or any optax state holding one.

  The state may be nested (`optax.chain`, `optax.MultiSteps`,
  `optax.inject_hyperparams`, a Flax `TrainState.opt_state`...). Leaves that
  `mask` excluded are `None`; integer, boolean and key leaves hold the latest
  params' values. Nothing is computed or copied: the arrays returned are the
  state's own, so a jitted step that donates the optimizer state deletes them;
  copy them first (`jax.tree.map(jnp.copy, ...)`, or
  `ema_jax.flax.export_ema`) to keep them across a donated step.

  Args:
    state: an optimizer state containing exactly one EMA state, or several and
      `which`.
    index: for a `multi_ema` state, which of its averages to read (the
      position of its decay in `decays`); must be `None` for other states.
    which: with several EMA states, the index of the one to read, in tree
      order (see the error message for where each is).
    memory_kind: `None` returns the average where it is. `'device'` returns
      it in device memory (an average kept in host memory with
      `ema(memory_kind='pinned_host')` is copied over; inside `jit` the copy
      is a transfer XLA schedules); `'pinned_host'` in host memory.

  Returns:
    The average, a tree like the params.

  Raises:
    ValueError: no EMA state, several and no `which`, a swapped state (the
      EMA is then in your params), or `index` missing for a multi-EMA state
      (or given for another state).

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.adam(1e-3), ema_jax.ema(0.99))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> ema_jax.ema_params(state)
    {'w': Array([0., 0., 0.], dtype=float32)}
  """
  memory_kind = _memory.check_memory_kind("memory_kind", memory_kind)
  _, found = _find(state, which)
  _check_index_for(found, index)
  if isinstance(found, _multi.MultiEmaState):
    if index is None:
      raise ValueError(
          f"The multi-EMA state holds {_multi._num_averages(found)} averages; "
          "pass `index=i` to read average i."
      )
    return _memory.put_tree(_multi.read(found, index), memory_kind)
  if isinstance(found, (SwappedEmaState, _multi.SwappedMultiEmaState)):
    raise ValueError(
        "The EMA state is swapped: the EMA weights are in your params now. "
        "Swap back with `ema_jax.swap(params, state)` to read it from the state."
    )
  return _memory.put_tree(found.ema, memory_kind)


def _check_index_for(found: Any, index: int | None) -> None:
  if index is not None and not _multi.is_multi_state(found):
    raise ValueError(
        f"`index={index}` picks one average of a `multi_ema` state, but the "
        "EMA state found is a single EMA; drop `index` (use `which` to choose "
        "among several EMA states)."
    )


def swap(
    params: optax.Params,
    state: optax.OptState,
    *,
    which: int | None = None,
    index: int | None = None,
    memory_kind: str | None = None,
) -> tuple[optax.Params, optax.OptState]:
  """Exchange the params and their EMA: evaluate with the EMA, then swap back.

  Pure and exact: it returns the EMA as params and a state holding the former
  params in the EMA's place; calling it again gives both trees back bit for
  bit. For an `ema()` state nothing is computed or copied (under jit it
  compiles to no arithmetic); for a `multi_ema` state, swapping in slices out
  average `index` (a copy of one average) and swapping back writes nothing.
  Outside jit, swapping back with the raw params instead of the EMA weights
  `swap` returned raises an error rather than overwrite the EMA.
  Swapped params keep the EMA's dtype (float32 for bfloat16 params by default).
  Leaves that `mask` excluded stay as they are in `params`.

  While swapped, the state is a `SwappedEmaState`: `update` refuses it with an
  error, so a training step cannot silently average the EMA with itself, and a
  checkpoint of it does not restore into an unswapped state.

  Args:
    params: the params (or, to swap back, the EMA weights that `swap` returned).
    state: an `EmaState`, a `SwappedEmaState`, or any optax state holding one.
    which: with several EMA states in `state`, the index of the one to swap.
    index: for a `multi_ema` state, which of its averages to swap in; swapping
      back needs no `index` (the state remembers it).
    memory_kind: `None` exchanges the trees as they are. `'device'` puts the
      returned params in device memory, and each leaf the state takes in
      their place where the leaf it replaces was: with an EMA kept in host
      memory (`ema(memory_kind='pinned_host')`), the EMA comes to the device
      to evaluate and the training params wait in host memory, so device
      memory use does not grow; swapping back with `memory_kind='device'`
      restores both placements. Transfers are exact.

  Returns:
    `(params, state)` swapped.

  Raises:
    ValueError: when `params` do not have the structure or shapes of the
      average (the message names the leaf), or `state` holds no EMA state.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.5))
    >>> params = jnp.array([2.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([2.0]), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> ema_weights, swapped = ema_jax.swap(params, state)
    >>> ema_weights  # evaluate with these
    Array([1.], dtype=float32)
    >>> params, state = ema_jax.swap(ema_weights, swapped)
    >>> params
    Array([0.], dtype=float32)
  """
  memory_kind = _memory.check_memory_kind("memory_kind", memory_kind)
  which, found = _find(state, which)
  _check_index_for(found, index)
  if _multi.is_multi_state(found):
    if memory_kind is not None:
      raise ValueError(
          "`memory_kind` applies to `ema()` states (host offload); a "
          "`multi_ema` state keeps its averages in device memory: drop it."
      )
    out, new_multi = _multi.swap(params, found, index)
    return out, _replace(state, which, new_multi)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  held_tree = found.ema if isinstance(found, EmaState) else found.raw_params
  held = _tree.flatten_like(treedef, held_tree, "EMA state")
  out_params: list[Any] = []
  keep: list[Any] = []
  for (path, p), h in zip(flat, held):
    if h is None:  # excluded by `mask`: stays in params
      out_params.append(p)
      keep.append(None)
      continue
    if jax.numpy.shape(p) != jax.numpy.shape(h):
      raise ValueError(
          f"Leaf {_tree.path_str(path)}: params have shape "
          f"{jax.numpy.shape(p)} but the EMA state holds shape "
          f"{jax.numpy.shape(h)}."
      )
    if isinstance(found, SwappedEmaState):
      _swap_check.refuse_raw_params(path, p, h)
    if memory_kind is not None:
      h, p = _memory.put(h, memory_kind), _memory.same_memory_as(p, h)
    out_params.append(h)
    keep.append(p)
  kept = jax.tree.unflatten(treedef, keep)
  if isinstance(found, EmaState):
    new: Any = SwappedEmaState(
        found.count, kept, found.debias_norm, found.rounding_key
    )
  else:
    new = EmaState(found.count, kept, found.debias_norm, found.rounding_key)
  return jax.tree.unflatten(treedef, out_params), _replace(state, which, new)
