"""Which form a state is in: EMA swapped into the params, or raw params in training."""

from __future__ import annotations

from typing import Any

from ema_jax import _multi
from ema_jax import _swap
from ema_jax._state import EmaState, SwappedEmaState, is_ema_state


def opt_state_swapped(opt_state: Any, which: int | None) -> bool:
  """True when the EMA state `which` in `opt_state` is in its swapped form."""
  _, found = _swap._find(opt_state, which)
  return isinstance(found, (SwappedEmaState, _multi.SwappedMultiEmaState))


def check_same_form(swapped: bool, stats_state: Any, where: str) -> None:
  """The EMA of the model state must be in the same form as the params' one."""
  if stats_state is None:
    return
  if not is_ema_state(stats_state):
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
