"""The Linen/NNX dispatch, written once: what a target is, and swapping it.

The hook, its context manager and the checkpoint helpers take either a Linen
`TrainState` (alone) or an NNX model with its `nnx.Optimizer`; this module is
the only place that tells them apart and checks the arguments that go with
each.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

import ema_jax
from ema_jax.flax import _linen
from ema_jax.flax import _nnx


def is_nnx(target: Any, optimizer: Any) -> bool:
  """`True` for an NNX model with its optimizer, `False` for a Linen state.

  Raises `TypeError` for anything else, or for the wrong companion argument.
  """
  if _linen.is_train_state(target):
    if optimizer is not None:
      raise TypeError(
          "With a Linen `TrainState` pass the state alone: its `opt_state` "
          "holds the EMA (and `ema_jax.flax.TrainState.stats_ema` the "
          "statistics' one)."
      )
    return False
  if isinstance(target, nnx.Module):
    if optimizer is None:
      raise TypeError(
          "With an NNX model pass its optimizer too: "
          "`hook.on_test_begin(model, optimizer)`; the EMA lives in "
          "`optimizer.opt_state`."
      )
    return True
  raise TypeError(
      "Expected a `flax.training.train_state.TrainState` or an `nnx.Module` "
      f"(with its `nnx.Optimizer`), got {type(target).__name__}."
  )


def swapped(holder: Any, which: int | None) -> bool:
  """Whether the EMA is swapped in, for a Linen `TrainState`, an
  `nnx.Optimizer` or any optax state; checks the statistics' EMA agrees."""
  if _linen.is_train_state(holder):
    return _linen.swapped(holder, which)
  if isinstance(holder, nnx.Optimizer):
    return _nnx.swapped(holder, which)
  return ema_jax.is_swapped(holder, which=which)


def set_form(
    target: Any,
    optimizer: Any,
    which: int | None,
    ema_in: bool,
    index: int | None = None,
) -> Any:
  """Put the EMA (`ema_in=True`) or the raw weights in; nothing if already there.

  Returns the new `TrainState` (Linen) or `None` (NNX, swapped in place).
  `index` picks the average of a multi-EMA state to swap in (swapping back
  needs none: the swapped state records it).
  """
  if is_nnx(target, optimizer):
    _nnx.set_form(target, optimizer, which, ema_in, index)
    return None
  if _linen.swapped(target, which) == ema_in:
    return target
  return _linen.toggle(target, which, index)


def set_form_in_place(
    model: Any,
    optimizer: Any,
    which: int | None,
    ema_in: bool,
    index: int | None = None,
) -> bool:
  """`set_form` for an NNX model; returns whether the EMA was in before."""
  is_nnx(model, optimizer)
  return _nnx.set_form(model, optimizer, which, ema_in, index)


def unchanged(target: Any) -> Any:
  """What a hook method that does nothing returns: the state (Linen) or None."""
  return target if _linen.is_train_state(target) else None
