"""Several EMAs of the same params in one transformation, stacked on a leading axis."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ema_jax import _ema
from ema_jax import _swap_check
from ema_jax import _tree


class MultiEmaState(NamedTuple):
  """State of `ema_jax.multi_ema`: `n` averages of the params, stacked.

  Attributes:
    count: number of updates seen so far. shape=(), int32.
    ema: a tree like the params. Averaged leaves hold all `n` averages stacked
      on a new leading axis, shape `(n, *param.shape)`, sharded like the param
      on the trailing axes; integer, boolean and PRNG-key leaves hold the
      latest param value once (they are the same for every average); leaves
      excluded by `mask` are `None`.

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> state = ema_jax.multi_ema([0.9, 0.99]).init({"w": jnp.ones(3)})
    >>> state.count, state.ema["w"].shape
    (Array(0, dtype=int32), (2, 3))
  """

  count: jax.Array  # type: ignore[assignment]  # optax's field name
  ema: Any


class SwappedMultiEmaState(NamedTuple):
  """A `MultiEmaState` whose average number `index` is out in the params.

  `ema_jax.swap(params, state, index=i)` makes it; swapping again restores the
  `MultiEmaState`. Like `SwappedEmaState`, it has a type and fields of its own,
  so `update` refuses it and a checkpoint of it does not restore into an
  unswapped template.

  Attributes:
    count: as in `MultiEmaState`.
    ema: the stacked averages, unchanged (slot `index` is written back from
      the params when swapping back).
    raw_params: the training params held while average `index` is swapped in;
      `None` at leaves excluded by `mask`.
    index: which average is out. shape=(), int32.

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> params = jnp.array([3.0])
    >>> state = ema_jax.multi_ema([0.9, 0.99]).init(params)
    >>> ema_weights, swapped = ema_jax.swap(params, state, index=1)
    >>> type(swapped).__name__, swapped.index
    ('SwappedMultiEmaState', Array(1, dtype=int32))
  """

  count: jax.Array  # type: ignore[assignment]
  ema: Any
  raw_params: Any
  index: jax.Array  # type: ignore[assignment]


def is_multi_state(x: Any) -> bool:
  return isinstance(x, (MultiEmaState, SwappedMultiEmaState))


def _stack(p: jax.Array, n: int) -> jax.Array:
  stacked = jnp.broadcast_to(p[None], (n, *jnp.shape(p)))
  sharding = getattr(p, "sharding", None)
  if isinstance(sharding, NamedSharding) and not isinstance(p, jax.core.Tracer):
    # Shard the leading axis nowhere: one average lives where its param does.
    spec = PartitionSpec(None, *sharding.spec)
    return jax.device_put(stacked, NamedSharding(sharding.mesh, spec))
  # Under jit XLA propagates the param's sharding to the trailing axes.
  return jnp.array(stacked, copy=True)


def _is_stacked(e: Any) -> bool:
  # Carried leaves are never floating, so every floating leaf is a stack.
  return e is not None and _tree.is_float(e)


def _num_averages(state: MultiEmaState | SwappedMultiEmaState) -> int:
  stacked = [e for e in jax.tree.leaves(state.ema) if _is_stacked(e)]
  return int(jnp.shape(stacked[0])[0]) if stacked else 0


def multi_ema(
    decays: Sequence[_ema.DecayLike],
    *,
    start_step: int = 0,
    update_every: int = 1,
    ema_dtype: Any = None,
    mask: _tree.MaskOrFn = None,
) -> optax.GradientTransformation:
  """Several EMAs of the params at once, updated together in one fused step.

  Average `i` follows `ema_jax.ema(decays[i], start_step=..., update_every=...,
  ...)` exactly, but all of them are kept stacked on a new leading axis of each
  averaged leaf, so one elementwise update per leaf serves all of them. Pick
  one with `ema_jax.ema_params(state, i)` or `ema_jax.swap(params, state,
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
    ema_dtype: dtype of the averages; `None` as in `ema_jax.ema`.
    mask: which floating leaves to average, as in `ema_jax.ema`.

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
    >>> ema_jax.ema_params(state, 0)["w"], ema_jax.ema_params(state, 1)["w"]
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
  start_step = _ema._check_int("start_step", start_step, 0)
  update_every = _ema._check_int("update_every", update_every, 1)
  rules = [
      _ema.schedule_rule(
          _ema.as_schedule(d, f"decays[{i}]"), start_step, update_every
      )
      for i, d in enumerate(decays)
  ]
  n = len(rules)
  # A single EMA validates `ema_dtype` and `mask` and decides, at `init`, each
  # leaf's kind and dtype; its averages are then stacked.
  single = _ema.make_ema(rules[0], ema_dtype=ema_dtype, mask=mask)

  def init_fn(params: optax.Params) -> MultiEmaState:
    ema = jax.tree.map(
        lambda e: _stack(e, n) if _is_stacked(e) else e,
        single.init(params).ema,
    )
    return MultiEmaState(count=jnp.zeros((), jnp.int32), ema=ema)

  def update_fn(
      updates: optax.Updates,
      state: MultiEmaState,
      params: optax.Params | None = None,
  ) -> tuple[optax.Updates, MultiEmaState]:
    flat, treedef, u_leaves, e_leaves, kinds = _ema.unpack_update(
        updates, state, params, mask,
        swapped=SwappedMultiEmaState, what="multi-EMA state",
    )
    p_leaves = [p for _, p in flat]
    # Check each stacked leaf as the single average it holds `n` of.
    unstacked = [
        jax.ShapeDtypeStruct(jnp.shape(e)[1:], e.dtype)
        if k is _tree.Kind.AVERAGE and _is_stacked(e) and jnp.ndim(e) > 0
        else e
        for e, k in zip(e_leaves, kinds)
    ]
    _tree.check_leaves(
        [path for path, _ in flat], p_leaves, unstacked, kinds, ema_dtype,
        "multi-EMA state",
    )
    for (path, _), e, k in zip(flat, e_leaves, kinds):
      if k is _tree.Kind.AVERAGE and jnp.shape(e)[0] != n:
        raise ValueError(
            f"Leaf {_tree.path_str(path)}: the multi-EMA state holds "
            f"{jnp.shape(e)[0]} averages but this transformation has {n} "
            "decays. Re-run `init` after changing `decays`."
        )

    actives, decays_now = zip(*(rule(state.count) for rule in rules))
    active, decay = jnp.stack(actives), jnp.stack(decays_now)
    new_ema: list[Any] = []
    new_updates: list[Any] = []
    for p, u, e, kind in zip(p_leaves, u_leaves, e_leaves, kinds):
      new_p = _ema._apply_update(p, u)
      if kind is _tree.Kind.AVERAGE:
        trailing = (1,) * jnp.ndim(new_p)
        e = _ema._average(
            e, new_p, active.reshape(n, *trailing), decay.reshape(n, *trailing)
        )
      elif kind is _tree.Kind.CARRY:
        e = _ema._copy(new_p)
      new_ema.append(e)
      new_updates.append(u)
    return jax.tree.unflatten(treedef, new_updates), MultiEmaState(
        count=optax.safe_increment(state.count),
        ema=jax.tree.unflatten(treedef, new_ema),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def read(state: MultiEmaState, index: int) -> Any:
  """Average `index` of a multi-EMA state, as a tree like the params."""
  n = _num_averages(state)
  index = _check_index(index, n)
  return jax.tree.map(
      lambda e: e[index] if _is_stacked(e) else e, state.ema
  )


def _check_index(index: Any, n: int) -> Any:
  if isinstance(index, jax.core.Tracer):
    return index
  try:
    i = int(index)
  except TypeError:
    raise TypeError(f"`index` must be an int, got {index!r}.") from None
  if not 0 <= i < n:
    raise ValueError(
        f"`index={i}` is out of range: the multi-EMA state holds {n} averages "
        f"(index 0 to {n - 1}, in the order of `decays`)."
    )
  return i


def swap(
    params: Any, state: MultiEmaState | SwappedMultiEmaState, index: Any
) -> tuple[Any, MultiEmaState | SwappedMultiEmaState]:
  """`ema_jax.swap` for a multi-EMA state: exchange params and average `index`."""
  n = _num_averages(state)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  stacked = _tree.flatten_like(treedef, state.ema, "multi-EMA state")
  if isinstance(state, MultiEmaState):
    if index is None:
      raise ValueError(
          f"The multi-EMA state holds {n} averages; pass `index=i` to swap "
          "average i into the params."
      )
    index = _check_index(index, n)
    held = stacked
  else:
    if index is not None and not isinstance(
        state.index, jax.core.Tracer
    ) and int(index) != int(state.index):
      raise ValueError(
          f"`index={index}` but average {int(state.index)} is swapped in; "
          "swap back with the same index (or `index=None`)."
      )
    index = state.index
    held = _tree.flatten_like(treedef, state.raw_params, "multi-EMA state")
  out_params: list[Any] = []
  new_ema: list[Any] = []
  kept: list[Any] = []
  for (path, p), e, h in zip(flat, stacked, held):
    if e is None:  # excluded by `mask`: stays in params
      out_params.append(p)
      new_ema.append(None)
      kept.append(None)
      continue
    one = e[0] if _is_stacked(e) else e
    if jnp.shape(p) != jnp.shape(one):
      raise ValueError(
          f"Leaf {_tree.path_str(path)}: params have shape {jnp.shape(p)} but "
          f"each average in the multi-EMA state has shape {jnp.shape(one)}."
      )
    if isinstance(state, MultiEmaState):
      out_params.append(e[index] if _is_stacked(e) else e)
      new_ema.append(e)
    else:
      _swap_check.refuse_raw_params(path, p, h)
      out_params.append(h)
      if _is_stacked(e):
        if jnp.result_type(p) != e.dtype:
          raise ValueError(
              f"Leaf {_tree.path_str(path)}: swapping back needs the average's "
              f"dtype {e.dtype}, got {jnp.result_type(p)}. Pass back the "
              "params that `swap` returned."
          )
        # The stack still holds average `index` as it was: keep it and drop
        # `p` (the copy `swap` handed out), so swapping back writes nothing.
        new_ema.append(e)
      else:
        new_ema.append(p)
    kept.append(p)
  if isinstance(state, MultiEmaState):
    new: Any = SwappedMultiEmaState(
        state.count,
        state.ema,
        jax.tree.unflatten(treedef, kept),
        jnp.asarray(index, jnp.int32),
    )
  else:
    new = MultiEmaState(state.count, jax.tree.unflatten(treedef, new_ema))
  return jax.tree.unflatten(treedef, out_params), new
