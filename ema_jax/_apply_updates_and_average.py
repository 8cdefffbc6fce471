"""`apply_updates_and_average`: the updates applied and the average moved, in one call."""

from __future__ import annotations

from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ema_jax import _checks
from ema_jax import _engine
from ema_jax import _leaves
from ema_jax import _state
from ema_jax._leaves import Kind


def _weight(decay: Union[float, jax.Array]) -> Any:
  """`1 - decay`: from a Python float in float64, as `ema()` computes it."""
  if isinstance(decay, jax.Array):
    if jnp.shape(decay) != ():
      raise ValueError(
          f"`decay` must be a scalar, got shape {jnp.shape(decay)}. Evaluate a "
          "schedule at the step count first: `decay=schedule(count)`."
      )
    if not jnp.issubdtype(jnp.result_type(decay), jnp.floating):
      raise TypeError(
          f"`decay` must be a floating scalar, got dtype {jnp.result_type(decay)}."
      )
    if not isinstance(decay, jax.core.Tracer):
      _checks.unit_float("decay", decay)
    return 1 - decay
  weight = 1.0 - _checks.unit_float("decay", decay)
  # Concrete: each leaf's update folds it (see `_engine.clip_weight`).
  return np.asarray(weight, jnp.result_type(float))


def apply_updates_and_average(
    params: optax.Params,
    updates: optax.Updates | None,
    ema: Any,
    decay: Union[float, jax.Array],
) -> tuple[optax.Params, Any]:
  """`optax.apply_updates` and one EMA step, from one expression.

  Returns the new params `params + updates` and the new average
  `ema + (1 - decay) * (params + updates - ema)`, computed by the same
  per-leaf update as `ema_jax.ema` (the weight `1 - decay` from a Python float
  in float64): for a constant decay the results are bit for bit those of
  `optax.chain(..., ema_jax.ema(decay))` followed by `optax.apply_updates`,
  float64 included. Like `optax.incremental_update`, it takes plain trees: keep
  the average yourself (an EMA in the optimizer state is updated by its
  transformation, which honours its options: debias, schedules, rounding,
  offload). It replaces `optax.apply_updates` followed by
  `optax.incremental_update`, and keeps a float32 average of bfloat16 params.

  Jit the train step and donate the params and the average, so both are
  updated in place and the average never exists twice (see the example), and
  pass the gradients as an argument: captured by a closure they become
  constants, and XLA may then plan an EMA-sized temporary. Both outputs come
  from one `params + updates`: a compiler with multi-output fusion can write
  them in one pass. XLA:CPU has none and runs two loops, the second reading the
  new params back; that is the least traffic it can do for two outputs, and
  this function makes sure it does no more (no copy of the donated params for
  bfloat16 params).

  Leaves: floating leaves are averaged in the average's own dtype; integer,
  boolean and PRNG-key leaves are carried (the average takes their new value);
  leaves where `ema` is `None` are not averaged (as `mask` leaves them in
  `ema_jax.ema`). `None` (or float0) update leaves leave the param unchanged.
  A decay outside [0, 1] given as a traced array is clipped into it, as in
  `ema_jax.ema`.

  Args:
    params: the params before the update.
    updates: the optimizer's updates, a tree like `params`, or `None` when the
      params are already updated (then only the average moves).
    ema: the average, a tree like `params` (a plain tree, not an EMA state).
    decay: the weight of the old average: a float in [0, 1] or a scalar array
      (e.g. a schedule evaluated at the step: `warmup_decay(0.999)(count)`).
      0 copies the new params.

  Returns:
    `(new_params, new_ema)`.

  Raises:
    ValueError: `decay` outside [0, 1] or not a scalar; trees of different
      structure or shapes (the message names the leaf).
    TypeError: `ema` is an ema_jax EMA state (update it with `tx.update`), a
      leaf is not an array, or a floating param has a non-floating average.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, ema_jax
    >>> opt = optax.sgd(0.5)
    >>> params = {"w": jnp.ones(2, jnp.bfloat16)}
    >>> opt_state = opt.init(params)
    >>> ema = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    >>> def step(params, opt_state, ema, grads):  # grads: an argument, not a closure
    ...   updates, opt_state = opt.update(grads, opt_state, params)
    ...   params, ema = ema_jax.apply_updates_and_average(params, updates, ema, 0.9)
    ...   return params, opt_state, ema
    >>> step = jax.jit(step, donate_argnums=(0, 1, 2))  # updated in place
    >>> grads = {"w": jnp.ones(2, jnp.bfloat16)}
    >>> params, opt_state, ema = step(params, opt_state, ema, grads)
    >>> params["w"], ema["w"]  # 0.9 * 1 + 0.1 * 0.5, in float32
    (Array([0.5, 0.5], dtype=bfloat16), Array([0.95, 0.95], dtype=float32))
  """
  if any(_state.is_state(x) for x in jax.tree.leaves(ema, is_leaf=_state.is_state)):
    raise TypeError(
        "`ema` is an ema_jax EMA state: its transformation updates it, with "
        "all its options (`updates, opt_state = tx.update(grads, opt_state, "
        "params)`). `apply_updates_and_average` takes a plain tree, e.g. one "
        "you keep yourself, like `optax.incremental_update`."
    )
  weight = _engine.clip_weight(_weight(decay))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  u_leaves = (
      [None] * len(flat)
      if updates is None
      else _leaves.flatten_like(treedef, updates, "updates")
  )
  e_leaves = _leaves.flatten_like(treedef, ema, "average `ema`")
  new_params = _engine.apply_updates([p for _, p in flat], u_leaves)
  new_ema: list[Any] = []
  averaged = []
  for (path, p), new_p, e in zip(flat, new_params, e_leaves):
    kind = _leaves.leaf_kind(path, p, covered=e is not None)
    _leaves.check_stored(path, p, e, kind, "average `ema`")
    if kind is Kind.AVERAGE:
      if not _leaves.is_float(e):
        raise TypeError(
            f"Leaf {_leaves.path_str(path)}: the average of floating params "
            f"must be floating, got dtype {_leaves.leaf_dtype(e)}."
        )
      averaged.append(len(new_ema))
      e = jnp.asarray(e)
    elif kind is Kind.CARRY:
      e = _engine.copy(new_p)
    new_ema.append(e)
  es = [new_ema[i] for i in averaged]
  ps = [new_params[i] for i in averaged]
  for i, e in zip(averaged, _engine.average_leaves(es, ps, weight)):
    new_ema[i] = e
  return jax.tree.unflatten(treedef, new_params), jax.tree.unflatten(treedef, new_ema)
