"""Which form a state is in: EMA swapped into the params, or raw params in training."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ema_jax._state import EmaState, SwappedEmaState


def step_if_advanced(
    before: list[Any],
    after: list[Any],
    step: Callable[..., Any],
    state: Any,
    *args: Any,
) -> Any:
  """`step(state, *args)` if an EMA count moved from `before` to `after`, else `state`.

  Under `optax.MultiSteps` (or anything that skips updates) the params' EMA
  moves only on real updates; the statistics' EMA must move with it, not on
  every call. Works on traced counts (a `lax.cond`). Without any EMA state in
  the optimizer there is nothing to follow: always step.
  """
  if not before:
    return step(state, *args)
  moved = jnp.any(jnp.stack([jnp.not_equal(b, a) for b, a in zip(before, after)]))
  return jax.lax.cond(moved, step, lambda s, *_: s, state, *args)


def check_same_form(swapped: bool, stats_state: Any, where: str) -> None:
  """The EMA of the model state must be in the same form as the params' one."""
  if stats_state is None:
    return
  if not isinstance(stats_state, (EmaState, SwappedEmaState)):
    raise TypeError(
        f"`{where}` must hold an ema_jax EmaState (made by the `average_stats` "
        f"transformation), got {type(stats_state).__name__}."
    )
  if isinstance(stats_state, SwappedEmaState) != swapped:
    params_form = "swapped in" if swapped else "not swapped in"
    stats_form = "is" if isinstance(stats_state, SwappedEmaState) else "is not"
    raise ValueError(
        f"The params' EMA is {params_form} but the EMA in `{where}` {stats_form}: "
        "they were swapped separately. Swap them together with "
        "`ema_jax.flax.SwapEMAWeights` (or `ema_jax.flax.ema_weights`), never "
        f"with `ema_jax.swap` on one of them. ({EmaState.__name__} = raw "
        f"weights in the model, {SwappedEmaState.__name__} = EMA in the model.)"
    )
