"""Reading the EMA out of an optimizer state, and swapping it with the params.

For every state kind (single or multi, plain or swapped, masked or inside
`optax.masked` / `optax.multi_transform`), through one alignment of the state
with the params.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ema_jax import _checks
from ema_jax import _leaves
from ema_jax import _memory
from ema_jax import _state
from ema_jax._leaves import Kind
from ema_jax._memory import MemoryKind


def _index(found: _state.AnyEmaState, index: Any) -> int | None:
  """The checked `index` for a state: required for multi, refused otherwise."""
  if not _state.is_multi(found):
    if index is not None:
      raise ValueError(
          f"`index={index}` picks one average of a `multi_ema` state, but the "
          "EMA state found is a single EMA; drop `index` (use `which` to "
          "choose among several EMA states)."
      )
    return None
  n = _state.num_averages(found)
  if index is None:
    raise ValueError(
        f"The multi-EMA state holds {n} averages; pass `index=i` to pick "
        "average i (the position of its decay in `decays`)."
    )
  return _checks.index(index, n)


def _pick(stored: Any, index: int | None) -> Any:
  """One leaf of the average: slot `index` of a stacked leaf, else as stored."""
  if index is None or _leaves.stored_kind(stored) is not Kind.AVERAGE:
    return stored
  # A static slice: `stored[index]` gathers with an index array in device
  # memory, which fails for an average kept in host memory.
  return jax.lax.index_in_dim(stored, index, keepdims=False)


def ema_params(
    state: optax.OptState,
    *,
    index: int | None = None,
    which: int | None = None,
    memory_kind: MemoryKind = None,
) -> optax.Params:
  """The EMA of the params, from an EMA state or any optax state holding one.

  The state may be nested (`optax.chain`, `optax.MultiSteps`,
  `optax.inject_hyperparams`, `optax.masked`, `optax.multi_transform`, a Flax
  `TrainState.opt_state`...). Leaves the EMA does not cover (excluded by
  `mask`, or outside the `optax.masked` / `multi_transform` part the EMA runs
  in) are `None`; integer, boolean and key leaves hold the latest params'
  values. For a single EMA nothing is computed or copied: the arrays returned
  are the state's own, so a jitted step that donates the optimizer state
  deletes them; copy them first (`jax.tree.map(jnp.copy, ...)`, or
  `ema_jax.flax.export_ema`) to keep them across a donated step.

  Args:
    state: an optimizer state containing exactly one EMA state, or several and
      `which`.
    index: for a `multi_ema` state, which of its averages to read (the
      position of its decay in `decays`), a Python int; must be `None` for
      other states.
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
      EMA is then in your params), `index` missing for a multi-EMA state,
      given for another state, or out of range.
    TypeError: `index` not a Python int (a traced index cannot be checked).

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.adam(1e-3), ema_jax.ema(0.99))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> ema_jax.ema_params(state)
    {'w': Array([0., 0., 0.], dtype=float32)}
  """
  memory_kind = _checks.memory_kind(memory_kind)
  _, found = _state.find(state, which)
  _checks.not_swapped(found, "`ema_params`")
  i = _index(found, index)

  def read(stored: Any) -> Any:
    if _leaves.is_uncovered(stored):
      return None
    return _memory.put(_pick(stored, i), memory_kind)

  return jax.tree.map(read, found.ema, is_leaf=_leaves.is_uncovered)


def swap(
    params: optax.Params,
    state: optax.OptState,
    *,
    which: int | None = None,
    index: int | None = None,
    memory_kind: MemoryKind = None,
) -> tuple[optax.Params, optax.OptState]:
  """Exchange the params and their EMA: evaluate with the EMA, then swap back.

  Pure and exact. Swapping in returns the EMA as params and a swapped state
  that keeps the average and holds the former params beside it; swapping
  back returns those params and the unswapped state, bit for bit. Swapping
  back takes the average from the state, never from the params it is given
  (their structure and shapes are checked, their values are not used), so
  no mistake can lose the average: swapping back with a copy of the raw
  params, or across separately jitted calls, restores the same state.

  Cost: for an `ema()` state nothing is computed or copied: the params
  handed out are the state's own average arrays (under jit, no arithmetic);
  for a `multi_ema` state, swapping in slices out a copy of average `index`.
  Swapping back computes and copies nothing. Donating the swapped-in params
  to a jitted function deletes the average they share with the state.
  Swapped params keep the EMA's dtype (float32 for bfloat16 params by
  default). Leaves the EMA does not cover (excluded by `mask`, or outside its
  `optax.masked` / `multi_transform` part) stay as they are in `params`.

  While swapped, the state is a `SwappedEmaState` (or
  `SwappedMultiEmaState`): `update` refuses it with an error, so a training
  step cannot silently average the EMA with itself, and a checkpoint of it
  does not restore into an unswapped state.

  Args:
    params: the params (or, to swap back, the EMA weights that `swap` returned).
    state: an EMA state, swapped or not, or any optax state holding one.
    which: with several EMA states in `state`, the index of the one to swap.
    index: for a `multi_ema` state, which of its averages to swap in, a
      Python int; swapping back needs no `index` (the state records it).
    memory_kind: `None` exchanges the trees as they are. `'device'` puts the
      returned params in device memory, and each leaf the state takes in
      their place where the average it stands beside is: with an EMA kept in
      host memory (`ema(memory_kind='pinned_host')`), the EMA comes to the
      device to evaluate and the training params wait in host memory, so
      device memory use does not grow; swapping back with
      `memory_kind='device'` brings them back. Transfers are exact.

  Returns:
    `(params, state)` swapped.

  Raises:
    ValueError: when `params` do not have the structure or shapes of the
      average (the message names the leaf), `state` holds no EMA state, or
      `index` is missing, out of range or given for a single EMA.
    TypeError: `index` not a Python int (a traced index cannot be checked).

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
  memory_kind = _checks.memory_kind(memory_kind)
  which, found = _state.find(state, which)
  multi = _state.is_multi(found)
  what = "multi-EMA state" if multi else "EMA state"
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  stored = _leaves.flatten_like(treedef, found.ema, what)
  n = _state.num_averages(found) if multi else None
  swapped = isinstance(found, _state.SWAPPED_TYPES)
  if swapped:
    if index is not None:
      i = _index(found, index)
      recorded: Any = getattr(found, "index")
      if not isinstance(recorded, jax.core.Tracer) and i != int(recorded):
        raise ValueError(
            f"`index={index}` but average {int(recorded)} is swapped in; "
            "swap back with `index=None` (the state records which)."
        )
    held = _leaves.flatten_like(treedef, getattr(found, "raw_params"), what)
  else:
    i = _index(found, index)

  out: list[Any] = []
  raw: list[Any] = []
  for k, ((path, p), e) in enumerate(zip(flat, stored)):
    kind = _leaves.stored_kind(e)
    _leaves.check_stored(path, p, e, kind, what, num_averages=n)
    if kind is Kind.SKIP:
      out.append(p)
      raw.append(e)  # the state's placeholder: None or optax.MaskedNode
    elif swapped:
      out.append(_memory.put(held[k], memory_kind))
    else:
      ema_leaf = _pick(e, i)
      if memory_kind is not None:
        ema_leaf = _memory.put(ema_leaf, memory_kind)
        p = _memory.same_memory_as(p, e)
      out.append(ema_leaf)
      raw.append(p)

  new: Any
  if swapped:
    rest = (found.debias_norm, found.rounding_key)
    new = (_state.MultiEmaState if multi else _state.EmaState)(
        found.count, found.ema, *rest
    )
  elif multi:
    new = _state.SwappedMultiEmaState(
        found.count, found.ema, jax.tree.unflatten(treedef, raw),
        jnp.asarray(i, jnp.int32), found.debias_norm, found.rounding_key,
    )
  else:
    new = _state.SwappedEmaState(
        found.count, found.ema, jax.tree.unflatten(treedef, raw),
        found.debias_norm, found.rounding_key,
    )
  return jax.tree.unflatten(treedef, out), _state.replace(state, which, new)
