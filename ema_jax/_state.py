"""The EMA state types, and how to find one inside any optax state.

One family: `EmaState` holds one average per leaf, `MultiEmaState` holds `n`
stacked on a leading axis, and each has a swapped form that `ema_jax.swap`
makes while the EMA weights are out in the params. The four types share their
fields, so every function reads them the same way; the type is the one static
fact the arrays cannot tell (whether averaged leaves carry the leading axis).
A second static fact rides along: `power_profile`, which power functions the
averages are, when they are ones.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp

from ema_jax import _leaves


class PowerProfile(NamedTuple):
  """What a `multi_ema` of power-function EMAs averages: a static record.

  An `ema` or `multi_ema` whose decays are all `power_decay`s, with
  `start_step=0` and a Python int `update_every`, records this in its state,
  so that `ema_jax.posthoc.Snapshotter` can tell its tracker from any other
  `multi_ema` (whose averages look the same). It is static: a pytree node
  without leaves, held in the tree structure, so it costs nothing on the
  device, passes through `jit` and every optax wrapper, and comes back from
  a checkpoint with the template it is restored into (nothing of it is
  written to an Orbax checkpoint).

  Attributes:
    gammas: the exponent of each average, in the order they are stacked.
    update_every: the `update_every` the averages were built with.

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> power = [ema_jax.power_decay(gamma=g) for g in (6.94, 16.97)]
    >>> ema_jax.multi_ema(power).init(jnp.zeros(2)).power_profile
    PowerProfile(gammas=(6.94, 16.97), update_every=1)
    >>> print(ema_jax.multi_ema([0.9, 0.99]).init(jnp.zeros(2)).power_profile)
    None
  """

  gammas: tuple[float, ...]
  update_every: int


# No children: the record lives in the tree structure, never as a leaf.
jax.tree_util.register_pytree_node(
    PowerProfile, lambda profile: ((), profile), lambda profile, _: profile
)


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
    power_profile: a `PowerProfile` when the average is a power-function
      EMA from the first update on (`power_decay`); `None` otherwise, and
      once `ema_jax.reset` restarted it after an update, or a transformation
      of another decay updated it. Static: no leaf.

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> state = ema_jax.ema(0.9).init({"w": jnp.ones(2), "step": jnp.int32(0)})
    >>> state.count, state.ema["w"], state.debias_norm is None
    (Array(0, dtype=int32), Array([1., 1.], dtype=float32), True)
  """

  count: jax.Array  # type: ignore[assignment]  # optax's field name
  ema: Any
  debias_norm: jax.Array | None = None
  rounding_key: jax.Array | None = None
  power_profile: PowerProfile | None = None


class MultiEmaState(NamedTuple):
  """State of `ema_jax.multi_ema`: `n` averages of the params, stacked.

  Attributes:
    count: number of updates seen so far. shape=(), int32.
    ema: a tree like the params. Averaged leaves hold all `n` averages stacked
      on a new leading axis, shape `(n, *param.shape)`, sharded like the param
      on the trailing axes; integer, boolean and PRNG-key leaves hold the
      latest param value once (they are the same for every average); leaves
      excluded by `mask` are `None`.
    debias_norm: as in `EmaState`, one per average. shape=(n,).
    rounding_key: as in `EmaState`.
    power_profile: as in `EmaState`, for all the averages (the post-hoc
      tracker, `ema_jax.posthoc.Snapshotter.ema()`, records one).

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> state = ema_jax.multi_ema([0.9, 0.99]).init({"w": jnp.ones(3)})
    >>> state.count, state.ema["w"].shape
    (Array(0, dtype=int32), (2, 3))
  """

  count: jax.Array  # type: ignore[assignment]
  ema: Any
  debias_norm: jax.Array | None = None
  rounding_key: jax.Array | None = None
  power_profile: PowerProfile | None = None


class SwappedEmaState(NamedTuple):
  """An `EmaState` whose average is out in the params: `ema_jax.swap` made it.

  It keeps the average (`ema`) and holds the raw (training) parameters beside
  it, under a field name of its own, so that:

  * swapping back restores the average from here, whatever params it is given:
    nothing done to the params while swapped can lose or change it;
  * `update` refuses it with an error at trace time, at no run-time cost; and
  * a checkpoint written while swapped cannot be restored into an unswapped
    state template by mistake (the tree keys differ).

  Attributes:
    count: the count of the `EmaState`, held with shape (1,) while swapped:
      a step compiled for the unswapped state (a cached NNX graph,
      `nnx.cached_partial`) sees the new shape and refuses to train. int32.
    ema: the average, unchanged (the params handed out are these arrays).
    raw_params: the training parameters, held while the EMA is swapped in;
      `None` at leaves the EMA does not cover.
    debias_norm: as in `EmaState`.
    rounding_key: as in `EmaState`.
    power_profile: as in `EmaState`.

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> params = jnp.array([3.0])
    >>> ema_weights, swapped = ema_jax.swap(params, ema_jax.ema(0.9).init(params))
    >>> type(swapped).__name__, swapped.raw_params
    ('SwappedEmaState', Array([3.], dtype=float32))
  """

  count: jax.Array  # type: ignore[assignment]
  ema: Any
  raw_params: Any
  debias_norm: jax.Array | None = None
  rounding_key: jax.Array | None = None
  power_profile: PowerProfile | None = None


class SwappedMultiEmaState(NamedTuple):
  """A `MultiEmaState` whose average number `index` is out in the params.

  `ema_jax.swap(params, state, index=i)` makes it; swapping again restores the
  `MultiEmaState`. Like `SwappedEmaState`, it keeps every average, so swapping
  back cannot lose one, and it has a type and fields of its own, so `update`
  refuses it and a checkpoint of it does not restore into an unswapped
  template.

  Attributes:
    count: as in `SwappedEmaState`, shape=(1,), int32.
    ema: the stacked averages, unchanged.
    raw_params: the training params held while average `index` is swapped in;
      `None` at leaves the EMA does not cover.
    index: which average is out. shape=(), int32.
    debias_norm: as in `MultiEmaState`.
    rounding_key: as in `MultiEmaState`.
    power_profile: as in `MultiEmaState`.

  Examples:
    >>> import jax.numpy as jnp, ema_jax
    >>> params = jnp.array([3.0])
    >>> state = ema_jax.multi_ema([0.9, 0.99]).init(params)
    >>> ema_weights, swapped = ema_jax.swap(params, state, index=1)
    >>> type(swapped).__name__, swapped.index
    ('SwappedMultiEmaState', Array(1, dtype=int32))
  """

  count: jax.Array  # type: ignore[assignment]
  ema: Any
  raw_params: Any
  index: jax.Array  # type: ignore[assignment]
  debias_norm: jax.Array | None = None
  rounding_key: jax.Array | None = None
  power_profile: PowerProfile | None = None


AnyEmaState = Union[EmaState, MultiEmaState, SwappedEmaState, SwappedMultiEmaState]
STATE_TYPES = (EmaState, MultiEmaState, SwappedEmaState, SwappedMultiEmaState)
SWAPPED_TYPES = (SwappedEmaState, SwappedMultiEmaState)
# A swapped state holds its count with this shape, not (). The type alone
# cannot mark a swapped state everywhere: a step compiled with a cached graph
# (`nnx.cached_partial`) keeps seeing the unswapped NamedTuple type and only
# reads the values of the Variables it holds, the count's among them. A new
# shape is seen by every `jit` (it retraces), so every calling pattern refuses
# to train while swapped, before anything runs.
SWAPPED_COUNT_SHAPE = (1,)


def swapped_count(count: jax.Array) -> jax.Array:
  """The count as a swapped state holds it."""
  return jnp.reshape(count, SWAPPED_COUNT_SHAPE)


def unswapped_count(count: jax.Array) -> jax.Array:
  """The count of a swapped state, as the unswapped state holds it."""
  return jnp.reshape(count, ())


def is_swapped_form(state: Any) -> bool:
  """Whether an EMA state is swapped: by its type, or by its count's shape
  (what a cached graph that kept the unswapped type still shows)."""
  if isinstance(state, SWAPPED_TYPES):
    return True
  return is_state(state) and jnp.shape(state.count) == SWAPPED_COUNT_SHAPE
MULTI_TYPES = (MultiEmaState, SwappedMultiEmaState)


def is_state(x: Any) -> bool:
  """Whether `x` is an ema_jax EMA state, swapped or not."""
  return isinstance(x, STATE_TYPES)


def is_multi(x: Any) -> bool:
  return isinstance(x, MULTI_TYPES)


def num_averages(state: AnyEmaState) -> int:
  """How many averages the state holds (1 for a single EMA).

  A multi state without any averaged leaf gives 0: it has nothing to pick.
  """
  if not is_multi(state):
    return 1
  stacked = [
      e for e in jax.tree.leaves(state.ema)
      if _leaves.stored_kind(e) is _leaves.Kind.AVERAGE
  ]
  return int(jnp.shape(stacked[0])[0]) if stacked else 0


def find(state: Any, which: int | None) -> tuple[int, AnyEmaState]:
  """The EMA state number `which` inside an optax state, and that number."""
  found = [
      (path, s)
      for path, s in jax.tree_util.tree_flatten_with_path(
          state, is_leaf=is_state
      )[0]
      if is_state(s)
  ]
  if not found:
    raise ValueError(
        "No ema_jax EMA state found in `state`. Pass the optimizer state of a "
        "transformation that contains `ema_jax.ema()` (put it last in your "
        "optax.chain) or a preset."
    )
  if which is None:
    if len(found) > 1:
      places = ", ".join(_leaves.path_str(path) for path, _ in found)
      raise ValueError(
          f"`state` holds {len(found)} EMA states (at {places}); pass "
          "`which=i` to pick the i-th, counting from 0 in that order."
      )
    which = 0
  if isinstance(which, bool) or not isinstance(which, int):
    raise TypeError(f"`which` must be a Python int, got {which!r}.")
  if not 0 <= which < len(found):
    raise ValueError(
        f"`which={which}` is out of range: `state` holds {len(found)} EMA "
        "state(s)."
    )
  return which, found[which][1]


def replace(state: Any, which: int, new: AnyEmaState) -> Any:
  """`state` with its EMA state number `which` replaced by `new`."""
  if is_state(state):
    return new
  seen = itertools.count()

  def pick(x: Any) -> Any:
    return new if is_state(x) and next(seen) == which else x

  return jax.tree.map(pick, state, is_leaf=is_state)


def counts(state: Any) -> list[jax.Array]:
  """The `count` of every EMA state inside an optax state, in tree order."""
  return [s.count for s in jax.tree.leaves(state, is_leaf=is_state) if is_state(s)]


def is_swapped(state: Any, *, which: int | None = None) -> bool:
  """Whether the EMA weights are out in the params (the state is swapped).

  Decided from the state's type alone: `ema_jax.swap` turns an `EmaState`
  into a `SwappedEmaState` (a `MultiEmaState` into a `SwappedMultiEmaState`)
  and back, so nothing outside the state needs to remember it.

  Args:
    state: an EMA state or any optax state holding one.
    which: with several EMA states in `state`, the index of the one to ask
      about (as in `ema_jax.swap`).

  Returns:
    `True` while the EMA is swapped into the params.

  Raises:
    ValueError: no EMA state in `state`, or several and no `which`.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax
    >>> tx = optax.chain(optax.sgd(0.1), ema_jax.ema(0.9))
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> ema_jax.is_swapped(state)
    False
    >>> ema_weights, state = ema_jax.swap(params, state)
    >>> ema_jax.is_swapped(state)
    True
  """
  _, found = find(state, which)
  return isinstance(found, SWAPPED_TYPES)
