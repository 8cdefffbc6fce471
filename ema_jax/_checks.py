"""Every argument check, in one place: each names the argument and the fix.

The transformations call these when they are built, so a wrong setting fails
at construction, not at the first step, and every caller gives the same
message for the same mistake.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _state

INT32_MAX = 2**31 - 1
MEMORY_KINDS = ("device", "pinned_host")
ROUNDINGS = ("nearest", "stochastic")
# The dtypes an average can be kept in. Narrower floats (float8) cannot hold
# an average: 1 - decay is below their resolution for any useful decay.
EMA_DTYPES = tuple(
    np.dtype(d)
    for d in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64,
              jnp.complex64, jnp.complex128)
)
# bfloat16 is the top half of float32, so stochastic rounding is a bit trick.
STOCHASTIC_DTYPES = (np.dtype(jnp.bfloat16),)

# Every count from 0 to 1024, then about 2000 counts spaced evenly in log
# scale up to the largest int32 count, and the last few counts.
PROBE_COUNTS = np.unique(
    np.concatenate([
        np.arange(0, 1025),
        np.geomspace(1025, INT32_MAX, 2000).astype(np.int64),
        INT32_MAX - np.arange(16),
    ])
).astype(np.int32)


def integer(name: str, value: Any, minimum: int, maximum: int = INT32_MAX) -> int:
  """A Python int in `[minimum, maximum]` (the counters are int32)."""
  if isinstance(value, (bool, np.bool_)) or isinstance(value, jax.core.Tracer):
    raise TypeError(f"`{name}` must be a Python int, got {value!r}.")
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"`{name}` must be an int, got {value!r}.") from None
  if not minimum <= value <= maximum:
    raise ValueError(
        f"`{name}` must be in [{minimum}, {maximum}], got {value} (the step "
        "counters are int32)."
    )
  return value


def boolean(name: str, value: Any) -> bool:
  """A bool, not a truthy string or number."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be True or False, got {value!r}.")
  return bool(value)


DECAY_HINT = (
    "A decay is the weight kept by the old average: 0.999 averages over about "
    "1000 steps."
)


def unit_float(name: str, value: Any, hint: str = DECAY_HINT) -> float:
  """A real number in [0, 1] given as a Python or NumPy number."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"`{name}` is traced (inside `jax.jit`, or injected by "
        "`optax.inject_hyperparams`), but it must be known when the "
        f"transformation is built. To change `{name}` during training, pass a "
        "schedule of the step count instead (a function of the count, e.g. "
        "`optax.linear_schedule(...)`, or `ema_jax.warmup_decay(...)`)."
    )
  if isinstance(value, (bool, np.bool_, str, bytes)) or not isinstance(
      value, (int, float, np.integer, np.floating, np.ndarray, jax.Array)
  ) or isinstance(value, jax.core.Tracer) or np.ndim(value) != 0:
    raise TypeError(
        f"`{name}` must be a float in [0, 1], got {value!r} of type "
        f"{type(value).__name__}."
    )
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(
        f"`{name}` must be in [0, 1], got {value}. {hint}"
    )
  return value


def positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
  """A positive (or, with `allow_zero`, non-negative), finite real number."""
  what = "a non-negative" if allow_zero else "a positive"
  if isinstance(value, (bool, np.bool_, str, bytes)):
    raise TypeError(f"`{name}` must be {what} number, got {value!r}.")
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"`{name}` must be {what} number, got {value!r}.") from None
  if not ((value >= 0.0 if allow_zero else value > 0.0) and math.isfinite(value)):
    raise ValueError(f"`{name}` must be {what} finite number, got {value}.")
  return value


def decay(name: str, value: Any) -> float | Callable[[jax.Array], jax.Array]:
  """A decay: a float in [0, 1], or a schedule checked at dense step counts.

  A schedule is traced once on an abstract int32 count (it must be
  jax-traceable and return a scalar), then evaluated at every count up to
  1024 and at about 2000 counts spaced in log scale up to 2**31 - 1: a value
  outside [0, 1], or NaN, at any of them fails here.
  """
  if not callable(value):
    return unit_float(name, value)
  try:
    out = jax.eval_shape(value, jax.ShapeDtypeStruct((), jnp.int32))
  except Exception as e:  # the user's schedule: any failure is theirs to see
    raise TypeError(
        f"The `{name}` schedule fails on a traced step count: {e!r}. A schedule "
        "must be a jax-traceable function of an int32 array (use jnp.where, "
        "not `if`), like optax's schedules."
    ) from e
  if getattr(out, "shape", None) != ():
    raise ValueError(
        f"The `{name}` schedule must return a scalar, but returns shape "
        f"{getattr(out, 'shape', None)} for a scalar step count."
    )
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(
        f"The `{name}` schedule must return a float, but returns {out.dtype}."
    )
  with jax.ensure_compile_time_eval():
    values = np.asarray(jax.vmap(value)(jnp.asarray(PROBE_COUNTS)), np.float64)
  bad = np.flatnonzero(~((values >= 0.0) & (values <= 1.0)))
  if bad.size:
    k = int(PROBE_COUNTS[bad[0]])
    raise ValueError(
        f"The `{name}` schedule returns {values[bad[0]]} at step {k}; a decay "
        "must be in [0, 1] at every step."
    )
  return value


def ema_dtype(value: Any) -> np.dtype | None:
  """`None`, or a dtype an average can be kept in."""
  if value is None:
    return None
  try:
    dtype = np.dtype(value)
  except TypeError:
    raise TypeError(f"`ema_dtype` is not a dtype: {value!r}.") from None
  if dtype not in EMA_DTYPES:
    raise ValueError(
        f"`ema_dtype` must be one of bfloat16, float16, float32, float64 (or "
        f"complex64/complex128 for complex params), got {dtype}. Narrower "
        "floats cannot resolve `1 - decay`."
    )
  return dtype


def rounding(value: Any, dtype: np.dtype | None) -> str:
  """`rounding`, checked against `ema_dtype`."""
  if value not in ROUNDINGS:
    raise ValueError(
        f"`rounding` must be 'nearest' or 'stochastic', got {value!r}."
    )
  if value == "stochastic" and dtype not in STOCHASTIC_DTYPES:
    raise ValueError(
        "`rounding='stochastic'` stores the EMA in bfloat16: pass "
        f"`ema_dtype=jnp.bfloat16` (got ema_dtype={dtype}). A float32 EMA "
        "needs no stochastic rounding."
    )
  return value


def memory_kind(value: Any, name: str = "memory_kind") -> Any:
  """`None`, 'device' or 'pinned_host'."""
  if value is None:
    return None
  if value not in MEMORY_KINDS:
    raise ValueError(
        f"`{name}` must be None, 'device' or 'pinned_host' (host offload), "
        f"got {value!r}."
    )
  return value


def memory_kind_available(value: str | None) -> None:
  """A clear error at `init` when the default device lacks `value`."""
  if value is None or value == "device":
    return
  device = jax.devices()[0]
  kinds = [m.kind for m in device.addressable_memories()]
  if value not in kinds:
    raise ValueError(
        f"`memory_kind={value!r}`: {device.platform} devices offer only "
        f"{kinds}. Use memory_kind=None to keep the EMA in device memory."
    )


def prng_key(value: Any) -> jax.Array:
  """A typed PRNG key from a key or an int seed, as `optax.add_noise` takes."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`key` must be a jax PRNG key or an int seed, got {value!r}.")
  if isinstance(value, (int, np.integer)):
    return jax.random.key(int(value))
  if (
      isinstance(value, jax.Array)
      and not isinstance(value, jax.core.Tracer)
      and value.shape == ()
      and jnp.issubdtype(value.dtype, jnp.integer)
  ):  # an int seed as a concrete array (`optax.inject_hyperparams` makes one)
    return jax.random.key(int(value))
  if isinstance(value, jax.Array) and jnp.issubdtype(
      value.dtype, jax.dtypes.prng_key
  ):
    if value.shape != ():
      raise ValueError(f"`key` must be a single key, got shape {value.shape}.")
    return value
  if (
      isinstance(value, jax.Array)
      and value.dtype == jnp.uint32
      and value.shape == (2,)
  ):
    return jax.random.wrap_key_data(value)
  raise TypeError(
      "`key` must be a jax PRNG key (`jax.random.key(0)`) or an int seed, got "
      f"{value!r}."
  )


def index(value: Any, n: int) -> int:
  """Which average of a `multi_ema` state: a Python int in range.

  A traced index cannot be checked (and indexing would clamp it silently), so
  it is refused.
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        "`index` must be a Python int, not a traced value: an index out of "
        "range cannot be detected under jit. Pass it as a static argument "
        "(`jax.jit(f, static_argnames='index')`)."
    )
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`index` must be an int, got {value!r}.")
  try:
    i = operator.index(value)
  except TypeError:
    raise TypeError(f"`index` must be an int, got {value!r}.") from None
  if n and not 0 <= i < n:
    raise ValueError(
        f"`index={i}` is out of range: the multi-EMA state holds {n} averages "
        f"(index 0 to {n - 1}, in the order of `decays`)."
    )
  return i


def not_swapped(state: Any, where: str) -> None:
  """The one refusal of a swapped state, whoever receives it."""
  if _state.is_swapped_form(state):
    raise ValueError(
        f"ema_jax: {where} got a swapped EMA state ({type(state).__name__} "
        f"with a count of shape {jnp.shape(state.count)}): the EMA weights "
        "are in the params and the raw weights are held in the optimizer "
        "state. Swap back first: `params, opt_state = ema_jax.swap(params, "
        "opt_state)`, or leave `ema_jax.flax.ema_weights(...)` / call the "
        "hook's `on_test_end` before training (a step compiled with "
        "`nnx.cached_partial` sees the swap through the count's shape)."
    )
