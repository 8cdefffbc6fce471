"""Reading the EMA out of an optimizer state, swapping it with the params,
blending it into them, and resetting it to them.

For every state kind (single or multi, plain or swapped, masked or inside
`optax.masked` / `optax.multi_transform`), through one alignment of the state
with the params (`_align`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ema_jax import _checks
from ema_jax import _engine
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


class _Leaf(NamedTuple):
  path: Sequence[Any]
  param: Any
  stored: Any  # what the state holds for it
  kind: Kind


class _Aligned(NamedTuple):
  which: int
  found: _state.AnyEmaState
  treedef: Any  # the params'
  leaves: list[_Leaf]
  num_averages: int | None  # for a multi-EMA state
  what: str  # the state's name in messages


def _align(params: Any, state: Any, which: int | None) -> _Aligned:
  """The EMA state in `state`, its leaves aligned with `params` and checked.

  The one alignment of every function that takes params and a state: the
  structure, each leaf's shape and its kind of number are checked, and a
  mismatch names the leaf's path.
  """
  which, found = _state.find(state, which)
  multi = _state.is_multi(found)
  what = "multi-EMA state" if multi else "EMA state"
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  stored = _leaves.flatten_like(treedef, found.ema, what)
  n = _state.num_averages(found) if multi else None
  leaves = []
  for (path, p), e in zip(flat, stored):
    kind = _leaves.stored_kind(e)
    _leaves.check_stored(
        path, p, e, kind, what, num_averages=n, number_kind=True
    )
    leaves.append(_Leaf(path, p, e, kind))
  return _Aligned(which, found, treedef, leaves, n, what)


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
  to a jitted function deletes the average they share with the state. That
  holds for `swap` called as it is, or inside a jitted step that uses what
  it returns; `jax.jit(swap)` alone makes XLA write each output to a buffer
  of its own, and the outputs hold the average twice (as the params and in
  the state), so even with both arguments donated it writes one
  param-sized tree. Keeping the average in the swapped state is what makes
  swapping back unable to lose it.
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
    memory_kind: where the returned params go. `None` (default): each where
      the leaf it replaces was, and each leaf the state takes in their place
      where the average it stands beside is: with an EMA kept in host memory
      (`ema(memory_kind='pinned_host')`) the EMA comes to the device to
      evaluate and the training params wait in host memory, so device memory
      use does not grow; swapping back brings them to the device again.
      `'device'` or `'pinned_host'` put the returned params there instead.
      Transfers are exact; without offload nothing moves.

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
  which, found, treedef, leaves, _, what = _align(params, state, which)
  multi = _state.is_multi(found)
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
  for k, (_, p, e, kind) in enumerate(leaves):
    if kind is Kind.SKIP:
      out.append(p)
      raw.append(e)  # the state's placeholder: None or optax.MaskedNode
    elif swapped:
      out.append(_placed(held[k], p, memory_kind))
    else:
      # The leaves trade places: each goes where the one it replaces was.
      out.append(_placed(_pick(e, i), p, memory_kind))
      raw.append(_memory.same_memory_as(p, e))

  new: Any
  rest = (found.debias_norm, found.rounding_key, found.power_profile)
  if swapped:
    new = (_state.MultiEmaState if multi else _state.EmaState)(
        _state.unswapped_count(found.count), found.ema, *rest
    )
  elif multi:
    new = _state.SwappedMultiEmaState(
        _state.swapped_count(found.count), found.ema,
        jax.tree.unflatten(treedef, raw), jnp.asarray(i, jnp.int32), *rest,
    )
  else:
    new = _state.SwappedEmaState(
        _state.swapped_count(found.count), found.ema,
        jax.tree.unflatten(treedef, raw), *rest,
    )
  return jax.tree.unflatten(treedef, out), _state.replace(state, which, new)


def _placed(x: Any, replaced: Any, memory_kind: str | None) -> Any:
  """`x` in `memory_kind`, or by default where `replaced` is."""
  if memory_kind is None:
    return _memory.same_memory_as(x, replaced)
  return _memory.put(x, memory_kind)


def blend(
    params: optax.Params,
    opt_state: optax.OptState,
    alpha: float,
    *,
    which: int | None = None,
    index: int | None = None,
) -> optax.Params:
  """The params moved toward their EMA: `alpha * ema + (1 - alpha) * params`.

  Writing the EMA back into the params: Switch EMA, Keras'
  `ema_overwrite_frequency` and ema-pytorch's `update_model_with_ema_every`
  (`alpha=1` every N steps; ema-pytorch's `update_model_with_ema_beta=b` is
  `alpha=1 - b`), or a one-time blend of the EMA into the final weights.
  The result has the params' dtype, sharding and memory kind; it is exactly
  the params at `alpha=0` and exactly the EMA cast to their dtype at
  `alpha=1`, computed in float32 or wider in between. Leaves the EMA carries
  (integer, boolean, keys) or does not cover (`mask`) are the params' own.
  The state is not changed; the optimizer's own state (Adam's moments) is
  not either. Jittable, with `alpha` a Python float or a float32 (or wider)
  scalar that may be traced (Switch EMA computes it in the step); a traced
  alpha outside [0, 1] is clipped into it at run time (NaN keeps the
  params). `index` is a Python int.

  Args:
    params: the params, a tree like the ones the EMA was initialised with.
    opt_state: an EMA state or any optax state holding one, not swapped.
    alpha: the weight of the EMA, a float in [0, 1], or a traced scalar.
    which: with several EMA states in `opt_state`, the index of the one to use.
    index: for a `multi_ema` state, which of its averages to blend in.

  Returns:
    The blended params, a tree like `params`.

  Raises:
    ValueError: a concrete `alpha` outside [0, 1]; a swapped state; `params` whose
      structure, shapes or kinds of number differ from the state's (the
      message names the leaf); `index` missing, out of range or given for a
      single EMA.
    TypeError: `alpha` not a real number, or of a dtype narrower than
      float32; `index` not a Python int.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.5))
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([-4.0]), state, params)
    >>> params = optax.apply_updates(params, updates)  # 4; the EMA is 2
    >>> ema_jax.blend(params, state, 0.25)  # 0.25 * 2 + 0.75 * 4
    Array([3.5], dtype=float32)
    >>> ema_jax.blend(params, state, 1.0)  # write the EMA back
    Array([2.], dtype=float32)
  """
  alpha = _checks.unit_float(
      "alpha", alpha,
      "`alpha` is the weight of the EMA: 0 keeps the params, 1 writes the EMA "
      "into them.", traced=True,
  )
  _, found, treedef, leaves, _, _ = _align(params, opt_state, which)
  _checks.not_swapped(found, "`blend`")
  i = _index(found, index)
  traced = _checks.is_traced(alpha)
  # A traced alpha is clipped at run time as a decay's weight is; a Python
  # one stays concrete, so each leaf's update folds it.
  weight: Any = _engine.clip_weight(alpha) if traced else np.asarray(alpha)
  out = [p for _, p, _, _ in leaves]
  blended = [
      j for j, (_, _, _, kind) in enumerate(leaves)
      if kind is Kind.AVERAGE and (traced or alpha > 0)
  ]
  ps = [jnp.asarray(out[j]) for j in blended]
  # One EMA step of the params toward the EMA, with weight `alpha`.
  emas = [_memory.same_memory_as(_pick(leaves[j][2], i), p) for j, p in zip(blended, ps)]
  for j, p in zip(blended, _engine.average_leaves(ps, emas, weight)):
    out[j] = p
  return jax.tree.unflatten(treedef, out)


def reset(
    opt_state: optax.OptState,
    params: optax.Params,
    *,
    which: int | None = None,
) -> optax.OptState:
  """The state with its average restarted from `params`.

  Every average (all of a `multi_ema` state's) becomes a copy of `params` in
  its own dtype, with its sharding and memory kind; carried leaves take the
  params' values; the count, the rest of the EMA state and every other
  optimizer state are unchanged, so schedules continue where they were.
  With `debias=True` the restarted average has its full weight (the
  normaliser is set to 1): the next update moves it by `1 - decay`, as
  without `debias`, and never copies over it. Use it to restart an EMA, or to start a
  teacher apart from the student: BYOL initialises its target network from
  another seed. Averages restarted after an update are no longer power
  functions of the steps: the state loses its `power_profile` then (and
  under `jit`, where the count is not known), so
  `ema_jax.posthoc.Snapshotter` refuses to snapshot it. The profile is
  static (in the tree structure), so the two branches of a `lax.cond` that
  resets such a state in one branch only differ in structure, and JAX
  refuses the cond: reset outside it, or in both branches.

  Args:
    opt_state: an EMA state or any optax state holding one, not swapped.
    params: the new average, a tree with the structure, shapes and kinds of
      number of the params the state was made for (an averaged leaf may be
      any float dtype: it is cast to the average's dtype; a carried leaf must
      have the params' dtype).
    which: with several EMA states in `opt_state`, the index of the one to reset.

  Returns:
    `opt_state` with the average replaced.

  Raises:
    ValueError: a swapped state, or `params` whose structure, shapes or kinds
      of number differ from the state's (the message names the leaf).

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(1.0), ema_jax.ema(0.9))
    >>> state = tx.init(jnp.zeros(2, jnp.bfloat16))
    >>> state = ema_jax.reset(state, jnp.array([1.0, 2.0], jnp.bfloat16))
    >>> ema_jax.ema_params(state)  # float32, the average's dtype
    Array([1., 2.], dtype=float32)
  """
  which, found, treedef, leaves, n, _ = _align(params, opt_state, which)
  _checks.not_swapped(found, "`reset`")
  starts = iter([
      _memory.placed_like(
          _engine.start_leaf(p, kind, _leaves.leaf_dtype(e), n), e
      )
      for _, p, e, kind in leaves
      if kind is not Kind.SKIP
  ])
  # Into the state's own structure: an `optax.MaskedNode` standing for a
  # whole subtree (a prefix mask) stays one node.
  ema = jax.tree.map(
      lambda e: e if _leaves.is_uncovered(e) else next(starts),
      found.ema, is_leaf=_leaves.is_uncovered,
  )
  norm = found.debias_norm
  # Restarted at the params with their full weight: with `debias=True` a norm
  # of 0 (a reset before any update) would let the next update copy over it.
  new = found._replace(
      ema=ema,
      debias_norm=None if norm is None else jnp.ones_like(norm),
  )
  if not _before_any_update(found.count):
    # Restarted at step t, the averages are no longer power functions of the
    # steps (the first update of a power EMA copies: before it, they still are).
    new = new._replace(power_profile=None)
  return _state.replace(opt_state, which, new)


def _before_any_update(count: Any) -> bool:
  """Whether `count` is known to be 0 (under `jit` it is not known)."""
  return not isinstance(count, jax.core.Tracer) and int(count) == 0
