"""The engine under every EMA: one per-leaf update, one transformation.

`ema()`, `multi_ema()`, every preset and `apply_updates_and_average` are this
module with different rules. A rule maps the update count to a `Step`: whether
this update averages, and the weight `1 - decay` of the new params (one per
average). `transformation` builds the optax `GradientTransformation` around a
rule; `average_leaves` is the arithmetic of every leaf (each with an optional
leading axis of `n` averages), for `blend` and `apply_updates_and_average` too.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ema_jax import _checks
from ema_jax import _leaves
from ema_jax import _memory
from ema_jax import _rounding
from ema_jax import _schedules
from ema_jax._leaves import Kind
from ema_jax._state import EmaState, MultiEmaState, PowerProfile


class Step(NamedTuple):
  """What one update does, from the rule.

  `weight` is `1 - decay`, shape `(n,)` for `n` averages (or `()`); 1 copies
  the new params. `keep`, when given, is Keras' decay: that preset averages as
  `keep * e + (1 - keep) * p`, Keras' own float32 arithmetic, bit for bit.
  """

  active: jax.Array
  weight: jax.Array
  keep: jax.Array | None = None


Rule = Callable[[jax.Array], Step]


def schedule_rule(
    schedules: Sequence[_schedules.Schedule], start_step: Any, update_every: Any
) -> Rule:
  """Copy for `start_step` updates, then average every `update_every`-th one.

  An update that stands for `update_every` steps uses the product of the
  schedule's decays over those steps, so the horizon in optimizer steps does
  not depend on `update_every` (for a constant decay, `decay ** k`; for a power
  profile, EDM2's `(1 - k / t) ** (gamma + 1)`). The product is taken as
  `-expm1(sum(log1p(-weight)))`, which keeps its complement exact near 1, and
  only on the updates that average. `start_step` and `update_every` may be
  traced int scalars (`optax.inject_hyperparams` injects them); they are
  clamped to at least 0 and 1. Once the int32 count saturates (2**31 - 1
  updates) every update averages with the one-step weight.
  """
  dtype = jnp.result_type(float)  # one dtype for every average's weight
  weights = [_schedules.weight_fn(s) for s in schedules]
  static_k = isinstance(update_every, int)
  if isinstance(start_step, int) and start_step == 0 and (
      static_k and update_every == 1
      and all(getattr(s, "constant", False) for s in schedules)
  ):
    # Every update averages with the same weight: constants, not functions of
    # the run-time count, so XLA folds them into each leaf's loop (no per-
    # element select for a copy that never happens, no cond).
    active: Any = np.bool_(True)
    # Concrete even when the transformation is built inside a trace
    # (`jax.eval_shape` of a template, a step that builds it under `jit`);
    # a traced decay (injected, vmapped) stays a traced scalar.
    with jax.ensure_compile_time_eval():
      weight: Any = jnp.stack(
          [jnp.asarray(f(jnp.zeros((), jnp.int32)), dtype) for f in weights]
      )
    if not _checks.is_traced(weight):
      weight = np.asarray(weight)
    folded = Step(active, weight)
    return lambda count: folded

  def one_step(j: jax.Array) -> jax.Array:
    return jnp.stack([jnp.asarray(f(j), dtype) for f in weights])

  def over_steps(j: jax.Array, k: Any) -> jax.Array:
    """`1 - prod(1 - w)` over the `k` steps ending at averaged step `j`."""
    # Per schedule, as `ema` computes its one: each average of a `multi_ema`
    # is bitwise the `ema` of its decay.
    return jnp.stack([
        -jnp.expm1(log_keep(f, getattr(s, "constant", False), j, k))
        for f, s in zip(weights, schedules)
    ])

  def log_keep(f: Any, constant: bool, j: jax.Array, k: Any) -> jax.Array:
    def log1m(step: jax.Array) -> jax.Array:
      return jnp.log1p(-jnp.asarray(f(step), dtype))

    if constant:
      return jnp.asarray(k, dtype) * log1m(j)
    if static_k and update_every <= 64:
      steps = jnp.maximum(j - jnp.arange(update_every - 1, -1, -1, dtype=j.dtype), 0)
      return jnp.sum(jax.vmap(log1m)(steps))
    # No k-sized array: a loop, run only on the updates that average.
    return jax.lax.fori_loop(
        0, k, lambda i, acc: acc + log1m(jnp.maximum(j - i, 0)),
        jnp.zeros((), dtype),
    )

  starts_at_0 = isinstance(start_step, int) and start_step == 0

  def rule(count: jax.Array) -> Step:
    if starts_at_0:  # the count is never negative: nothing to copy
      j, copying = count, None
    else:
      j = count - jnp.clip(start_step, 0, _checks.INT32_MAX).astype(count.dtype)
      copying = j < 0
      j = jnp.maximum(j, 0)
    if static_k and update_every == 1:
      w = one_step(j)
      due: Any = np.bool_(True)  # every update averages: no cond
    else:
      k = jnp.maximum(jnp.asarray(update_every, count.dtype), 1)
      saturated = count == _checks.INT32_MAX
      due = saturated | (j % k == k - 1)
      w = jax.lax.cond(
          due & ~saturated, lambda j: over_steps(j, k), one_step, j
      )
    if copying is None:
      return Step(due, w)
    return Step(copying | due, jnp.where(copying, jnp.ones_like(w), w))

  return rule


def copy(x: Any, dtype: Any = None) -> jax.Array:
  # A real copy even under jit: a jitted function that returns its input
  # unchanged hands back the same buffer, and donating the state would then
  # delete the params.
  return jnp.array(x, dtype=dtype, copy=True)


def apply_updates(ps: Sequence[Any], us: Sequence[Any]) -> list[jax.Array]:
  """`optax.apply_updates` over aligned leaves, tolerating None/float0 updates."""
  new = [jnp.asarray(p) for p in ps]
  summed = [
      i for i, u in enumerate(us)
      if u is not None and getattr(u, "dtype", None) != jax.dtypes.float0
  ]
  sums = [_add(ps[i], us[i]) for i in summed]
  for i, x in zip(summed, _materialize(sums)):
    new[i] = x
  return new


def _add(p: Any, u: Any) -> jax.Array:
  """`p + u` in the params' dtype. The primitive itself when nothing is to be
  promoted or broadcast: a `jnp` operator is a jitted call, several times the
  cost to trace, once per leaf (benchmarks/run.py's `first` section)."""
  if (isinstance(p, jax.Array) and isinstance(u, jax.Array)
      and p.dtype == u.dtype and p.shape == u.shape
      and jnp.issubdtype(p.dtype, jnp.inexact)):
    return jax.lax.add(p, u)
  return jnp.asarray(p + u).astype(_leaves.leaf_dtype(p))


def _materialize(new_ps: list[jax.Array]) -> list[jax.Array]:
  """Make the EMA read the new params from memory instead of recomputing them.

  In a jitted step with donated params, XLA:CPU otherwise folds `p + u` into the
  EMA loop for bfloat16 params; as the params loop overwrites `p` in place, it
  must then copy `p` and materialise `u` first: two params-sized temporaries
  and ~1.6x the bytes (benchmarks/run.py, tests/test_performance.py). Other
  backends fuse the two outputs themselves and keep the plain expression.
  One barrier for all leaves: one per leaf lowered to two conditionals per
  leaf, whose tracing, lowering and compiling were most of the EMA's cost in
  time to the first step (benchmarks/run.py's `first` section).
  """
  if not any(isinstance(x, jax.core.Tracer) for x in new_ps):
    return new_ps
  return jax.lax.platform_dependent(
      new_ps, cpu=jax.lax.optimization_barrier, default=lambda x: x
  )


def clip_weight(weight: Any) -> Any:
  """A weight in [0, 1]: a decay out of range (or NaN) cannot push the average
  outside the range of the params. Above 1 copies; below 0 or NaN keeps.
  A concrete (NumPy) weight stays concrete, so each leaf's update folds it."""
  xp = np if isinstance(weight, (np.ndarray, np.generic)) else jnp
  return xp.where(weight > 0, xp.minimum(weight, 1), xp.zeros_like(weight))


def average_leaves(
    es: Sequence[jax.Array],
    ps: Sequence[jax.Array],
    weight: Any,
    keep: Any = None,
    keys: Sequence[jax.Array | None] | None = None,
    memory_kind: str | None = None,
) -> list[jax.Array]:
  """One EMA step of each leaf `e` towards its `p`: `e + weight * (p - e)`.

  The one per-leaf update, for every leaf of an update at once. `weight` is
  one scalar for every leaf, or `n` weights, shape `(n,)`, when each `e`
  holds `n` averages on a leading axis; a NumPy weight (a constant decay) is
  folded into the arithmetic. The arithmetic is in float32 or wider; a
  weight of 1 gives `p` exactly. With `keep` (the Keras preset, shaped as
  `weight`) the form is Keras' `keep * e + (1 - keep) * p`. With a key the
  result is rounded stochastically into `e`'s dtype (bfloat16). With
  `memory_kind` (an offloaded average) each `e` is moved to the device for
  its arithmetic and its result back, leaf by leaf.

  The scalars are computed once for each rank and compute dtype of the
  leaves, not once per leaf; under `jit` the folded constants reach the
  leaves through one `optimization_barrier` (`_opaque`): each leaf
  broadcasts its own copy.
  """
  keys = [None] * len(es) if keys is None else keys
  on_device = "device" if memory_kind else None
  kinds = [(jnp.ndim(e), _leaves.compute_dtype(e.dtype)) for e in es]
  scalars = {kind: _scalars(weight, keep, *kind) for kind in dict.fromkeys(kinds)}
  if any(isinstance(e, jax.core.Tracer) for e in es):
    scalars = _opaque(scalars)
  out = []
  for e, p, key, kind in zip(es, ps, keys, kinds):
    copies, factors = scalars[kind]
    e = _memory.put(e, on_device)
    ef, pf = _as(e, kind[1]), _as(p, kind[1])
    if keep is None:
      mixed = _copy_where(copies, pf, lambda: _lerp(ef, pf, factors[0]))
    else:
      mixed = _copy_where(copies, pf, lambda: factors[0] * ef + factors[1] * pf)
    e = _as(mixed, e.dtype) if key is None else _rounding.stochastic_round(mixed, key)
    out.append(_memory.put(e, memory_kind))
  return out


Scalars = tuple[Any, tuple[Any, ...]]


def _scalars(weight: Any, keep: Any, rank: int, compute: Any) -> Scalars:
  """What the update of a leaf of `rank` computed in `compute` uses: whether
  it copies the params, and what it multiplies by, `(weight,)` or Keras'
  `(keep, 1 - keep)`; `n` weights broadcast against the leaf's trailing axes.
  NumPy for a NumPy weight."""
  def shaped(x: Any) -> Any:
    if jnp.ndim(x) == 1:  # one per average, on the leaf's leading axis
      x = x.reshape((-1,) + (1,) * (rank - 1))
    return x.astype(compute)

  if keep is None:
    w = shaped(weight)
    return w == 1, (w,)
  k = shaped(keep)
  return k == 0, (k, 1 - k)


def _opaque(scalars: dict[Any, Scalars]) -> dict[Any, Scalars]:
  """The scalars as a jitted update uses them: the concrete factors through
  one barrier.

  Folded into every leaf's arithmetic, a NumPy weight is a constant of the
  leaf's shape, and jaxlib 0.5.3's XLA makes it one constant for all leaves of
  that shape and dtype; its partitioner then moves it between devices for
  each differently sharded leaf (an all-to-all and a collective-permute;
  newer XLA broadcasts it again where it is needed). Behind one
  `optimization_barrier` each leaf broadcasts its own copy, and XLA folds the
  constant back into each leaf's loop after partitioning: the same bytes and
  loops, one op per update (tests/test_sharding.py, tests/test_performance.py).
  Each distinct constant passes the barrier once. A concrete `copies` stays
  NumPy: it decides in Python whether a leaf copies. Traced factors stay as
  they are: XLA:CPU expands the barrier before it fuses, so the barrier would
  not keep their scalar arithmetic out of each leaf's loop.
  """
  def key(x: Any) -> Any:
    return (x.dtype, x.shape, x.tobytes())

  def concrete(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic))

  distinct = {
      key(x): x for _, factors in scalars.values() for x in factors if concrete(x)
  }
  if not distinct:
    return scalars
  opaque = dict(zip(distinct, jax.lax.optimization_barrier(list(distinct.values()))))
  return {
      kind: (copies, tuple(opaque[key(x)] if concrete(x) else x for x in factors))
      for kind, (copies, factors) in scalars.items()
  }


def _as(x: jax.Array, dtype: Any) -> jax.Array:
  return x if x.dtype == dtype else x.astype(dtype)


def _lerp(e: jax.Array, p: jax.Array, w: Any) -> jax.Array:
  """`e + w * (p - e)`; with primitives where the shapes match and `w` is a
  scalar (see `_add`), as `jnp` computes it."""
  if e.shape == p.shape and jnp.ndim(w) == 0:
    return jax.lax.add(e, jax.lax.mul(w, jax.lax.sub(p, e)))
  return e + w * (p - e)


def _copy_where(copies: Any, p: jax.Array, mix: Callable[[], jax.Array]) -> jax.Array:
  """`p` where `copies`, else `mix()`: decided in Python for a concrete weight
  (a constant decay), else one select (a scalar `copies` needs no `jnp.where`,
  which is a call per leaf to trace, lower and inline)."""
  if isinstance(copies, (np.ndarray, np.generic)):
    if copies.all():
      return copy(jnp.broadcast_to(p, jnp.broadcast_shapes(copies.shape, p.shape)))
    if not copies.any():
      return mix()
  mixed = mix()
  if jnp.ndim(copies) == 0 and p.shape == mixed.shape:
    return jax.lax.select(copies, p, mixed)
  return jnp.where(copies, p, mixed)


def overwrite_dtype(p: Any, u: Any) -> np.dtype:
  """The updates' dtype when the EMA is written back: float32 or wider, so
  that `p + u` can reach a bfloat16/float16 param's EMA exactly."""
  return np.dtype(jnp.promote_types(_leaves.compute_dtype(_leaves.leaf_dtype(p)), u.dtype))


@jax.jit
def overwrite_update(p: Any, u: Any, e: jax.Array) -> jax.Array:
  """The update `u` with `optax.apply_updates(p, u)` equal to the EMA `e`.

  The target is `e` in the params' dtype, what Keras assigns. The update is
  in `overwrite_dtype`: for bfloat16/float16 params `p + u` is then exactly
  the target unless the param is over 2**16 (float16: 2**13) times its EMA;
  for float32 params (and there) it is the `p + u` nearest the target that a
  float32 update reaches (no float32 `u` gives `0.3 + u == -0.001` exactly).
  Of `round(target - p)` and its two neighbours, the one landing nearest.
  Jitted for the reason `_rounding.stochastic_round` is: each leaf's
  constants (`nextafter`'s) stay its own on jaxlib 0.5.3.
  """
  p_dtype = _leaves.leaf_dtype(p)
  dtype = overwrite_dtype(p, u)
  target = e.astype(p_dtype)
  pf, tf = jnp.asarray(p).astype(dtype), target.astype(dtype)
  def miss(candidate: jax.Array) -> jax.Array:
    return jnp.abs((pf + candidate).astype(p_dtype).astype(dtype) - tf)

  best = tf - pf
  best_miss = miss(best)
  for candidate in (jnp.nextafter(best, -jnp.inf), jnp.nextafter(best, jnp.inf)):
    candidate_miss = miss(candidate)
    closer = candidate_miss < best_miss
    best = jnp.where(closer, candidate, best)
    best_miss = jnp.where(closer, candidate_miss, best_miss)
  return best


def _stack(x: jax.Array, n: int) -> jax.Array:
  stacked = jnp.broadcast_to(x[None], (n, *jnp.shape(x)))
  # A tracer's `.sharding` raises (JAX builds its message by walking the
  # whole jaxpr traced so far: quadratic in the leaves), so it is not asked.
  sharding = None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding):
    # Shard the leading axis nowhere: one average lives where its param does.
    spec = PartitionSpec(None, *sharding.spec)
    return jax.device_put(stacked, NamedSharding(sharding.mesh, spec))
  # Under jit XLA propagates the param's sharding to the trailing axes.
  return jnp.array(stacked, copy=True)


def start_leaf(
    p: Any, kind: Kind, dtype: Any, num_averages: int | None
) -> Any:
  """What `init` stores for one leaf, and `ema_jax.reset` stores again.

  A copy of `p` in `dtype`, stacked `num_averages` times on a new leading axis
  for an averaged leaf of a multi-EMA state; `None` for a skipped leaf.
  """
  if kind is Kind.SKIP:
    return None
  x = copy(p, dtype)
  if num_averages is not None and kind is Kind.AVERAGE:
    x = _stack(x, num_averages)
  return x


def transformation(
    rule: Rule,
    num_averages: int | None,
    *,
    debias: bool = False,
    ema_dtype: Any = None,
    mask: _leaves.Mask = None,
    rounding: str = "nearest",
    key: Any = 0,
    memory_kind: str | None = None,
    overwrite_every: int | None = None,
    power_profile: PowerProfile | None = None,
) -> optax.GradientTransformation:
  """The EMA transformation of `rule`, for one average or `num_averages`.

  Every option is checked here, when the transformation is built. A
  `power_profile` (what `rule` averages, when its decays are power functions)
  is recorded in the state; an update keeps it only in a state that records
  the same, so a state updated by another rule never claims it.
  """
  debias = _checks.boolean("debias", debias)
  dtype = _checks.ema_dtype(ema_dtype)
  rounding = _checks.rounding(rounding, dtype)
  first_key = _checks.prng_key(key)
  memory_kind = _checks.memory_kind(memory_kind)
  if overwrite_every is not None:
    overwrite_every = _checks.integer("ema_overwrite_frequency", overwrite_every, 1)
  if num_averages is not None:
    num_averages = _checks.integer("len(decays)", num_averages, 1)
  stacked = num_averages is not None
  n = num_averages or 1
  state_type = MultiEmaState if stacked else EmaState
  what = "multi-EMA state" if stacked else "EMA state"
  weight_shape = (n,) if stacked else ()

  def expected_dtype(p: Any, kind: Kind, path: Any = ()) -> Any:
    p_dtype = _leaves.leaf_dtype(p)
    if kind is not Kind.AVERAGE:
      return p_dtype
    return _leaves.ema_dtype_for(p_dtype, dtype, path)

  def init_fn(params: optax.Params) -> Any:
    _checks.memory_kind_available(memory_kind)
    kinds = _leaves.leaf_kinds(params, mask)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    # `memory_kind` places the averages. Carried leaves (ints, bools, PRNG
    # keys) stay where the params are: a key in host memory is aliased to a
    # device output of its shape by a donated jit, and XLA aborts.
    ema = [
        _memory.put(
            start_leaf(p, kind, expected_dtype(p, kind, path), num_averages),
            memory_kind if kind is Kind.AVERAGE else None,
        )
        for (path, p), kind in zip(flat, kinds)
    ]
    return state_type(
        count=jnp.zeros((), jnp.int32),
        ema=jax.tree.unflatten(treedef, ema),
        # float64 when x64 is on, so float64 params are debiased exactly.
        debias_norm=(
            jnp.zeros(weight_shape, jnp.result_type(float)) if debias else None
        ),
        # A buffer of this state's own: donating the state deletes it.
        rounding_key=copy(first_key) if rounding == "stochastic" else None,
        power_profile=power_profile,
    )

  def update_fn(
      updates: optax.Updates, state: Any, params: optax.Params | None = None
  ) -> tuple[optax.Updates, Any]:
    _checks.not_swapped(state, "`update`")
    if not isinstance(state, state_type):
      raise TypeError(
          f"This transformation keeps a {state_type.__name__}, but `update` got "
          f"a {type(state).__name__}. Pass the state its own `init` returned."
      )
    if params is None and state.ema is not None:  # None is also an empty tree
      raise ValueError(
          "ema_jax needs `params`: call `tx.update(grads, opt_state, params)` "
          "(the EMA is taken of `params + updates`)."
      )
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    p_leaves = [p for _, p in flat]
    u_leaves = _leaves.flatten_like(treedef, updates, "updates")
    e_leaves = _leaves.flatten_like(treedef, state.ema, what)
    kinds = _leaves.leaf_kinds(params, mask)
    for (path, p), e, kind in zip(flat, e_leaves, kinds):
      _leaves.check_stored(
          path, p, e, kind, what,
          num_averages=num_averages, dtype=expected_dtype(p, kind, path),
      )
    if rounding == "stochastic" and state.rounding_key is None:
      raise ValueError(
          "ema_jax: `rounding='stochastic'` needs the PRNG key that `init` "
          "puts in the state, but `state.rounding_key` is None. Re-run `init` "
          "with this transformation."
      )

    step = rule(state.count)
    # `.reshape` keeps a NumPy (folded) weight NumPy and a traced one traced.
    weight = clip_weight(step.weight.reshape(weight_shape))
    debias_norm = state.debias_norm
    if debias_norm is not None:
      # The debiased average is itself an EMA, with weight w / n, where
      # n = n_prev + w (1 - n_prev) is the weight a zero-initialised average
      # has gathered (1 - prod(decays), with no cancellation).
      weight = weight.astype(debias_norm.dtype)
      norm = debias_norm + weight * (1 - debias_norm)
      weight = jnp.where(norm > 0, weight / norm, jnp.zeros_like(norm))
      debias_norm = jnp.where(step.active, norm, debias_norm)

    overwrite = None
    if overwrite_every is not None:
      overwrite = state.count % overwrite_every == overwrite_every - 1

    rounding_key, leaf_keys = _rounding.split(state.rounding_key, len(p_leaves))
    averaged = [i for i, kind in enumerate(kinds) if kind is Kind.AVERAGE]
    traced = isinstance(step.active, jax.core.Tracer)
    on_device = "device" if memory_kind else None

    def new_params() -> list[jax.Array]:
      return apply_updates([p_leaves[i] for i in averaged], [u_leaves[i] for i in averaged])

    # Under jit the new params are computed outside the cond, where they are
    # the value the step's `optax.apply_updates` computes anyway. Computed in
    # the branch, they kept the old params and the updates alive for it: two
    # EMA-sized temporaries and a 10x slower step with update_every=2 on CPU
    # (tests/test_performance.py). Eagerly, a skipped update computes nothing.
    outside = new_params() if traced else None

    def average(old: list[jax.Array]) -> list[jax.Array]:
      ps = outside if outside is not None else new_params()
      return average_leaves(
          old, ps, weight, step.keep, [leaf_keys[i] for i in averaged], memory_kind
      )

    # A cond, not a select: an update that does not average (update_every > 1)
    # makes no pass over the params and the average, and moves no offloaded
    # average to the device and back. Outside jit, a Python `if` keeps the
    # update op by op (a cond would compile it, fusing the arithmetic).
    old = [e_leaves[i] for i in averaged]
    if traced:
      new_list = jax.lax.cond(step.active, average, list, old)
    else:
      new_list = average(old) if bool(step.active) else old
    new_averages = dict(zip(averaged, new_list))
    if overwrite is not None:
      # Keras' `ema_overwrite_frequency`: the params become the EMA.
      written = [i for i in averaged if u_leaves[i] is not None]

      def write_back(us: list[Any]) -> list[Any]:
        return [
            overwrite_update(
                p_leaves[i], u, _memory.put(new_averages[i], on_device)
            )
            for i, u in zip(written, us)
        ]

      def keep(us: list[Any]) -> list[Any]:
        return [
            u.astype(overwrite_dtype(p_leaves[i], u)) for i, u in zip(written, us)
        ]

      us = [u_leaves[i] for i in written]
      if isinstance(overwrite, jax.core.Tracer):
        us = jax.lax.cond(overwrite, write_back, keep, us)
      else:
        us = write_back(us) if bool(overwrite) else keep(us)
      u_leaves = list(u_leaves)
      for i, u in zip(written, us):
        u_leaves[i] = u
    # The carried leaves' latest values, in one `apply_updates` (one barrier
    # for all of them, as for the averaged leaves).
    carried = [i for i, kind in enumerate(kinds) if kind is Kind.CARRY]
    latest = apply_updates(
        [p_leaves[i] for i in carried], [u_leaves[i] for i in carried]
    )
    new_ema = list(e_leaves)
    for i, e in new_averages.items():
      new_ema[i] = e
    for i, e in zip(carried, latest):
      new_ema[i] = copy(e)

    return jax.tree.unflatten(treedef, list(u_leaves)), state_type(
        count=optax.safe_increment(state.count),
        ema=jax.tree.unflatten(treedef, new_ema),
        debias_norm=debias_norm,
        rounding_key=rounding_key,
        # Averages another rule updated are no longer this profile's.
        power_profile=(
            power_profile if state.power_profile == power_profile else None
        ),
    )

  return optax.GradientTransformation(init_fn, update_fn)
