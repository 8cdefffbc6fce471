"""How the float32 average is rounded into a low-precision EMA: stochastic rounding.

Round-to-nearest into bfloat16 makes a slowly moving average stall: with decay
0.999 the step `(1 - decay) * (p - e)` is below half a bfloat16 ulp unless `p`
is hundreds of ulps away, so it rounds back to `e`. Rounding up or down at
random, with probabilities given by the distance to each neighbour, makes the
stored value unbiased (`E[round(x)] = x`), so the average moves at the right
speed on average and its error stays a zero-mean noise.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

Rounding = Literal["nearest", "stochastic"]


def _mix32(v: jax.Array) -> jax.Array:
  # A bijective 32-bit integer hash with low bias ("lowbias32", C. Wellons,
  # https://nullprogram.com/blog/2018/07/31/).
  v = v ^ (v >> 16)
  v = v * jnp.uint32(0x7FEB352D)
  v = v ^ (v >> 15)
  v = v * jnp.uint32(0x846CA68B)
  return v ^ (v >> 16)


def _noise16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """16 uniform random bits per element, as uint32 values below 2**16.

  A counter-based hash of each element's index, seeded from `key`: pure
  elementwise integer arithmetic, so XLA fuses it into the rounding and
  partitions it like the array, with no temporary buffer. (Threefry, behind
  `jax.random.bits`, materialises 16 bytes per element on CPU.)
  """
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(
        stride % 2**32
    )
    stride *= shape[dim]
  return _mix32(_mix32(index + seed[0]) ^ seed[1]) >> 16


@jax.jit
def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
  """`x` rounded to bfloat16, up or down with probability given by the distance.

  Adding 16 uniform random bits below the bfloat16 mantissa, then truncating,
  rounds the magnitude up with probability `(|x| - lo) / ulp`. The random bits
  depend on the key and each element's index only, so a sharded `x` is
  rounded shard by shard, with no communication, to the same values as an
  unsharded one. Jitted: in a step, each leaf's rounding is a call that XLA
  inlines on its own, with its own copies of the hash's constants (inlined
  by JAX, jaxlib 0.5.3's XLA made them one constant for all leaves of a shape
  and moved it between differently sharded leaves; see
  `_engine._opaque`).

  Args:
    x: float32 values (other float dtypes are converted first).
    key: a PRNG key, used once.

  Returns:
    bfloat16 values; NaN stays NaN, infinities stay infinite, and values that
    bfloat16 represents exactly are returned unchanged.
  """
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = (bits + _noise16(key, x.shape)) & jnp.uint32(0xFFFF0000)
  out = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  # A NaN's payload can carry into the sign and exponent bits.
  return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), out)


def split(key: jax.Array | None, n: int) -> tuple[jax.Array | None, list[Any]]:
  """The key for the next update, and one key per leaf (None without a key)."""
  if key is None:
    return None, [None] * n
  keys = jax.random.split(key, n + 1)
  return keys[0], list(keys[1:])
