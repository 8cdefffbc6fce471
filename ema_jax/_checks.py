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

# The counts a schedule is checked at when it is built: every count up to
# 1024, then 256 spaced evenly in log scale up to 2**30 (past any run; a
# schedule that only overflows int32 near 2**31 is not refused). Evaluated in
# one compiled call on the array of counts. A schedule that cannot take an
# array count (a `lax.cond` or a loop on it) is evaluated under `vmap` at the
# counts up to 64 and 64 more spaced in log scale up to 2**16, so a loop of
# `count` iterations stays short.
PROBE_COUNTS = np.unique(
    np.concatenate([np.arange(0, 1025), np.geomspace(1025, 2**30, 256)])
    .astype(np.int64)
).astype(np.int32)
SCALAR_PROBE_COUNTS = np.unique(
    np.concatenate([np.arange(0, 65), np.geomspace(65, 2**16, 64)])
    .astype(np.int64)
).astype(np.int32)


def is_traced(value: Any) -> bool:
  """A value known only when the step runs (under `jit`, `vmap`, `grad`...)."""
  return isinstance(value, jax.core.Tracer)


def traced_number(name: str, value: Any, kind: Any) -> jax.Array:
  """A traced scalar of `kind` (jnp.integer or jnp.floating), checked by
  shape and dtype (its value is checked where it is used)."""
  dtype = getattr(value, "dtype", None)
  if np.shape(value) != () or dtype is None or not jnp.issubdtype(dtype, kind):
    what = "an integer" if kind is jnp.integer else "a float"
    raise TypeError(
        f"`{name}` is traced, so it must be a scalar of {what} dtype, got "
        f"shape {np.shape(value)} and dtype {dtype}."
    )
  return value


def integer(
    name: str, value: Any, minimum: int, maximum: int = INT32_MAX,
    *, traced: bool = False,
) -> Any:
  """A Python int in `[minimum, maximum]` (the counters are int32).

  With `traced=True` a traced integer scalar is accepted as it is (from
  `optax.inject_hyperparams` or a `vmap`): its range cannot be checked before
  the step runs, so the caller clamps it there.
  """
  if is_traced(value):
    if traced:
      return traced_number(name, value, jnp.integer)
    raise TypeError(
        f"`{name}` must be a Python int, got a traced value: it decides the "
        "structure of the state. Pass it as a Python int (for "
        "`optax.inject_hyperparams`, in `static_args`)."
    )
  if isinstance(value, (bool, np.bool_)):
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


def unit_float(
    name: str, value: Any, hint: str = DECAY_HINT, *, traced: bool = False
) -> Any:
  """A real number in [0, 1] given as a Python or NumPy number or a JAX scalar.

  With `traced=True` a traced float scalar (from `optax.inject_hyperparams`,
  a `vmap` over decays, or computed in the step) is accepted as it is: its
  value is not known before the step runs, where the caller clips it.
  An array narrower than float32 is refused: 0.999 in bfloat16 is 1.0.
  """
  dtype = getattr(value, "dtype", None)
  if (
      dtype is not None and jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).bits < 32
  ):
    raise TypeError(
        f"`{name}` is a {dtype} value ({value!r}): that dtype cannot hold a "
        "decay (0.999 rounds to 1.0 in bfloat16 and the average would "
        "freeze). Pass it in float32; with `optax.inject_hyperparams` and "
        "low-precision params, pass `hyperparam_dtype=jnp.float32`."
    )
  if is_traced(value):
    if traced:
      return traced_number(name, value, jnp.floating)
    raise TypeError(
        f"`{name}` is traced (inside `jax.jit` or `vmap`), but it must be "
        "known when this is built; pass a Python float."
    )
  if isinstance(value, (bool, np.bool_, str, bytes)) or not isinstance(
      value, (int, float, np.integer, np.floating, np.ndarray, jax.Array)
  ) or np.ndim(value) != 0:
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


def positive_float(name: str, value: Any) -> float:
  """A positive, finite real number."""
  if isinstance(value, (bool, np.bool_, str, bytes)):
    raise TypeError(f"`{name}` must be a positive number, got {value!r}.")
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"`{name}` must be a positive number, got {value!r}.") from None
  if not (value > 0.0 and math.isfinite(value)):
    raise ValueError(f"`{name}` must be a positive finite number, got {value}.")
  return value


def decay(name: str, value: Any) -> Any:
  """A decay: a float in [0, 1], a traced float, or a schedule checked at
  the counts of `PROBE_COUNTS`.

  A schedule is traced once on an abstract int32 count (it must be
  jax-traceable and return a float32 or wider scalar), then evaluated once,
  compiled, on the array of probe counts (under `vmap` at the fewer
  `SCALAR_PROBE_COUNTS` if it cannot take an array): a value outside [0, 1],
  or NaN, at any of them fails here. A schedule whose value depends on a
  traced value (a decay injected or computed in the step) cannot be checked
  before the step runs; like every decay it is clipped into [0, 1] there.
  """
  if not callable(value):
    return unit_float(name, value, traced=True)
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
  if jnp.finfo(out.dtype).bits < 32:
    raise TypeError(
        f"The `{name}` schedule returns {out.dtype}, which cannot hold a decay "
        "(0.999 rounds to 1.0 in bfloat16 and the average would freeze). "
        "Compute it in float32."
    )
  counts, values = _probe(value)
  if values is None:  # depends on a traced value: clipped at run time
    return value
  bad = np.flatnonzero(~((values >= 0.0) & (values <= 1.0)))
  if bad.size:
    k = int(counts[bad[0]])
    raise ValueError(
        f"The `{name}` schedule returns {values[bad[0]]} at step {k}; a decay "
        "must be in [0, 1] at every step."
    )
  return value


def _probe(schedule: Any) -> tuple[np.ndarray, np.ndarray | None]:
  """The schedule at the probe counts (`None`: not known before run time)."""
  with jax.ensure_compile_time_eval():
    counts = PROBE_COUNTS
    try:
      out = jax.jit(schedule)(jnp.asarray(counts))
      if np.shape(out) != counts.shape:
        raise ValueError("not elementwise in the count")
    except Exception:  # a schedule of a scalar count only: vmap, fewer counts
      counts = SCALAR_PROBE_COUNTS
      out = jax.jit(jax.vmap(schedule))(jnp.asarray(counts))
  if is_traced(out):
    return counts, None
  return counts, np.asarray(out, np.float64)


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
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(
        f"`ema_dtype={dtype}` needs 64-bit JAX, which is off: JAX would keep "
        "the average in 32 bits. Turn it on first "
        "(`jax.config.update('jax_enable_x64', True)`), or pass a 32-bit dtype."
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
  if isinstance(value, (int, np.integer)) or (
      isinstance(value, jax.Array)
      and value.shape == ()
      and jnp.issubdtype(value.dtype, jnp.integer)
  ):  # an int seed, maybe as an array (`optax.inject_hyperparams` makes one)
    seed = value if is_traced(value) else int(value)
    try:
      return jax.random.key(seed)
    except (OverflowError, ValueError, TypeError) as e:
      raise ValueError(
          f"`key`: the seed {value!r} is out of the range JAX takes ({e}); "
          "pass a seed in [0, 2**32) or a key (`jax.random.key(0)`)."
      ) from None
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
