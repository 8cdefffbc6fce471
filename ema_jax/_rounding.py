"""How the float32 average is rounded into a low-precision EMA: stochastic rounding.

Round-to-nearest into bfloat16 makes a slowly moving average stall: with decay
0.999 the step `(1 - decay) * (p - e)` is below half a bfloat16 ulp unless `p`
is hundreds of ulps away, so it rounds back to `e`. Rounding up or down at
random, with probabilities given by the distance to each neighbour, makes the
stored value unbiased (`E[round(x)] = x`), so the average moves at the right
speed on average and its error stays a zero-mean noise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROUNDINGS = ("nearest", "stochastic")

# bfloat16 is the top 16 bits of float32, so rounding is a bit operation.
_STOCHASTIC_DTYPES = (np.dtype(jnp.bfloat16),)


def check_rounding(rounding: Any, ema_dtype: Any) -> str:
  """`rounding` validated against `ema_dtype` when the transformation is built."""
  if rounding not in ROUNDINGS:
    raise ValueError(
        f"`rounding` must be 'nearest' or 'stochastic', got {rounding!r}."
    )
  if rounding == "stochastic" and (
      ema_dtype is None or np.dtype(ema_dtype) not in _STOCHASTIC_DTYPES
  ):
    raise ValueError(
        "`rounding='stochastic'` stores the EMA in bfloat16: pass "
        f"`ema_dtype=jnp.bfloat16` (got ema_dtype={ema_dtype!r}). A float32 "
        "EMA needs no stochastic rounding."
    )
  return rounding


def make_key(key: Any) -> jax.Array:
  """A typed PRNG key from a key or an int seed, as `optax.add_noise` takes."""
  if isinstance(key, bool):
    raise TypeError(f"`key` must be a jax PRNG key or an int seed, got {key!r}.")
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"`key` must be a single key, got shape {key.shape}.")
    return key
  if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  raise TypeError(
      "`key` must be a jax PRNG key (`jax.random.key(0)`) or an int seed, got "
      f"{key!r}."
  )


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
  """`x` rounded to bfloat16, up or down with probability given by the distance.

  Adding 16 uniform random bits below the bfloat16 mantissa, then truncating,
  rounds the magnitude up with probability `(|x| - lo) / ulp`. The random bits
  come from a counter-based generator partitioned like `x`, so a sharded `x`
  is rounded shard by shard, with no communication, to the same values as an
  unsharded one.

  Args:
    x: float32 values (other float dtypes are converted first).
    key: a PRNG key, used once.

  Returns:
    bfloat16 values; NaN stays NaN, infinities stay infinite, and values that
    bfloat16 represents exactly are returned unchanged.
  """
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint16).astype(jnp.uint32)
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  out = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  # A NaN's payload can carry into the sign and exponent bits.
  return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), out)


def split(key: jax.Array | None, n: int) -> tuple[jax.Array | None, list[Any]]:
  """The key for the next update, and one key per leaf (None without a key)."""
  if key is None:
    return None, [None] * n
  keys = jax.random.split(key, n + 1)
  return keys[0], list(keys[1:])
