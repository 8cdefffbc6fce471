"""The EMA state, and the swapped form it takes while the EMA weights are out."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class EmaState(NamedTuple):
  """State of `ema_jax.ema`: the moving average of the parameters.

  Attributes:
    count: number of updates seen so far. shape=(), int32.
    ema: the average, a tree like the parameters. Averaged leaves are float32
      for bfloat16/float16 params by default; integer, boolean and PRNG-key
      leaves hold the latest parameter value; leaves excluded by `mask` are
      `None` (nothing is stored for them).
    debias_norm: with `debias=True`, the total weight `1 - prod(decays)` that a
      zero-initialised average would have, used to correct it; `None`
      otherwise. shape=(), float32 (float64 with x64 on).
    rounding_key: with `rounding='stochastic'`, the PRNG key the next update
      rounds with (split at every update); `None` otherwise. shape=(), a
      typed key.

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> state = ema_jax.ema(0.9).init({"w": jnp.ones(2), "step": jnp.int32(0)})
    >>> state.count, state.ema["w"], state.debias_norm is None
    (Array(0, dtype=int32), Array([1., 1.], dtype=float32), True)
  """

  count: jax.Array  # type: ignore[assignment]  # optax's field name
  ema: Any
  debias_norm: jax.Array | None
  rounding_key: jax.Array | None = None


class SwappedEmaState(NamedTuple):
  """An `EmaState` whose average is out in the params: `ema_jax.swap` made it.

  It holds the raw (training) parameters in place of the average, under a
  field name of its own, so that:

  * `update` refuses it with an error at trace time, at no run-time cost, and
  * a checkpoint written while swapped cannot be restored into an unswapped
    state template by mistake (the tree keys differ).

  Attributes:
    count: as in `EmaState`.
    raw_params: the training parameters, held while the EMA is swapped in;
      `None` at leaves excluded by `mask`.
    debias_norm: as in `EmaState`.
    rounding_key: as in `EmaState`.

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> params = jnp.array([3.0])
    >>> ema_weights, swapped = ema_jax.swap(params, ema_jax.ema(0.9).init(params))
    >>> type(swapped).__name__, swapped.raw_params
    ('SwappedEmaState', Array([3.], dtype=float32))
  """

  count: jax.Array  # type: ignore[assignment]
  raw_params: Any
  debias_norm: jax.Array | None
  rounding_key: jax.Array | None = None


def is_ema_state(x: Any) -> bool:
  return isinstance(x, (EmaState, SwappedEmaState))
