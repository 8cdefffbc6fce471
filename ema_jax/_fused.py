"""Applying the updates and averaging in one call: the hot path of a train step."""

from __future__ import annotations

from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

from ema_jax import _ema
from ema_jax import _schedules
from ema_jax import _tree
from ema_jax._state import EmaState, SwappedEmaState


def _as_decay(decay: Union[float, jax.Array]) -> jax.Array:
  if isinstance(decay, bool):
    raise TypeError("`decay` must be a float or a scalar array, got a bool.")
  if isinstance(decay, (int, float)):
    return jnp.asarray(_schedules._check_unit_interval("decay", decay), jnp.float32)
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
    _schedules._check_unit_interval("decay", float(decay))
  return jnp.asarray(decay)


def apply_updates_and_average(
    params: optax.Params,
    updates: optax.Updates | None,
    ema: Any,
    decay: Union[float, jax.Array],
) -> tuple[optax.Params, Any]:
  """`optax.apply_updates` and one EMA step, from one expression.

  Returns the new params `params + updates` and the new average
  `decay * ema + (1 - decay) * (params + updates)`, computed with the same
  arithmetic as `ema_jax.ema`: for a constant decay the results are bit for
  bit those of `optax.chain(..., ema_jax.ema(decay))` followed by
  `optax.apply_updates`. Use it when you keep the average yourself rather
  than in the optimizer state (it replaces `optax.apply_updates` followed by
  `optax.incremental_update`, and keeps a float32 average of bfloat16 params).

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

  Args:
    params: the params before the update.
    updates: the optimizer's updates, a tree like `params`, or `None` when the
      params are already updated (then only the average moves).
    ema: the average, a tree like `params` (e.g. `ema_jax.ema_params(state)`),
      or an `EmaState` (without `debias` or stochastic rounding); an
      `EmaState` is returned with its count advanced by one.
    decay: the weight of the old average: a float in [0, 1] or a scalar array
      (e.g. a schedule evaluated at the step: `warmup_decay(0.999)(count)`).
      0 copies the new params.

  Returns:
    `(new_params, new_ema)`, with `new_ema` of the type of `ema`.

  Raises:
    ValueError, TypeError: `decay` outside [0, 1] or not a scalar; trees of
      different structure or shapes (the message names the leaf); a swapped,
      debiased or stochastically rounded `EmaState`.

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
  d = _as_decay(decay)
  state = None
  if isinstance(ema, SwappedEmaState):
    raise ValueError(
        "`ema` is a swapped EMA state: the EMA weights are in your params. Swap "
        "back first: `params, state = ema_jax.swap(params, state)`."
    )
  if isinstance(ema, EmaState):
    if ema.debias_norm is not None:
      raise ValueError(
          "`ema` is an EmaState built with `debias=True`, whose decay depends "
          "on its history; update it through its transformation "
          "(`tx.update`), not with a fixed `decay`."
      )
    if ema.rounding_key is not None:
      raise ValueError(
          "`ema` is an EmaState built with `rounding='stochastic'`; update it "
          "through its transformation (`tx.update`), which draws the rounding "
          "noise from its key."
      )
    state, ema = ema, ema.ema

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  u_leaves = (
      [None] * len(flat)
      if updates is None
      else _tree.flatten_like(treedef, updates, "updates")
  )
  e_leaves = _tree.flatten_like(treedef, ema, "average `ema`")
  new_params: list[jax.Array] = []
  new_ema: list[jax.Array | None] = []
  for (path, p), u, e in zip(flat, u_leaves, e_leaves):
    new_p = _ema._apply_update(p, u)
    new_params.append(new_p)
    if e is None:
      new_ema.append(None)
      continue
    if jnp.shape(e) != jnp.shape(p):
      raise ValueError(
          f"Leaf {_tree.path_str(path)}: params have shape {jnp.shape(p)} but "
          f"the average has shape {jnp.shape(e)}."
      )
    if _tree.is_float(p):
      if not _tree.is_float(e):
        raise ValueError(
            f"Leaf {_tree.path_str(path)}: the average of floating params must "
            f"be floating, got dtype {jnp.result_type(e)}."
        )
      new_ema.append(_ema._average(e, new_p, None, d))
    else:
      new_ema.append(_ema._copy(new_p))
  out_params = jax.tree.unflatten(treedef, new_params)
  out_ema = jax.tree.unflatten(treedef, new_ema)
  if state is None:
    return out_params, out_ema
  return out_params, EmaState(
      count=optax.safe_increment(state.count),
      ema=out_ema,
      debias_norm=None,
  )
