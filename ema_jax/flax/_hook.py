"""`SwapEMAWeights`: Keras 3's callback for Flax, and its context-manager form."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, TypeVar, overload

from flax import nnx
from flax.training import train_state

from ema_jax.flax import _target

State = TypeVar("State", bound=train_state.TrainState)


def is_swapped(target: Any, *, which: int | None = None) -> bool:
  """Whether the EMA weights are in the model now (as the state's type records).

  Args:
    target: a Linen `TrainState`, an `nnx.Optimizer`, or any optax state
      holding an ema_jax EMA state.
    which: with several EMA states, which one (see `ema_jax.swap`).

  Returns:
    `True` when the EMA is swapped in (the state holds a `SwappedEmaState`).

  Raises:
    ValueError: no EMA state in `target`, or params and statistics in
      different forms.

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params=jnp.zeros(2),
    ...                           tx=optax.chain(optax.sgd(0.1), ema_jax.ema()))
    >>> ema_jax.flax.is_swapped(state)
    False
    >>> ema_jax.flax.is_swapped(ema_jax.flax.SwapEMAWeights().on_test_begin(state))
    True
  """
  return _target.swapped(target, which)


class SwapEMAWeights:
  """Evaluate with the EMA weights: Keras 3's `SwapEMAWeights` for Flax.

  Call its methods where Keras calls the callback's (`fit` calls
  `on_epoch_begin`, trains, then `on_test_begin`/`on_test_end` around
  validation, then `on_epoch_end`). Each method takes

  * a Linen `flax.training.train_state.TrainState` (or subclass) whose `tx`
    holds an ema_jax EMA, and returns the new state; or
  * an NNX model and its `nnx.Optimizer(model, tx, wrt=nnx.Param)`, and
    swaps them in place, returning `None`.

  Semantics (Keras 3.15's, with its `predict` bug fixed):

  * `on_test_begin` / `on_predict_begin` put the EMA weights into the model;
    `on_test_end` / `on_predict_end` put the raw weights back, bit for bit
    (Keras never swaps back after `predict`; this hook does).
  * With `swap_on_epoch=True`, `on_epoch_end` leaves the EMA in the model (so
    a checkpoint written next holds the EMA weights) and `on_epoch_begin` puts
    the raw weights back before training; with the default `False` both do
    nothing. Unlike Keras, the last `on_epoch_end` does not also overwrite the
    EMA with itself for a final `finalize_variable_values`; use
    `ema_jax.flax.export_ema` for the weights to deploy.
  * A call that finds the weights it is asked for already in place is a
    no-op, as in Keras, where a flag records which weights are in the model.
    Here the state records it itself: the EMA state is a `SwappedEmaState`
    exactly while the EMA is swapped in, so the hook holds no state of its own
    and a hook call can never swap twice or swap back what was not swapped.
    Training while swapped fails with an error (the optimizer refuses a
    `SwappedEmaState`); it never averages the EMA with itself.
  * Only parameters are swapped; `batch_stats` / `nnx.BatchStat` are left in
    place (as in Keras) unless their EMA is kept (`average_stats=` of
    `ema_jax.flax.TrainState` or `ema_jax.flax.Optimizer`): then they are
    swapped together with the params.
  * Swapping computes nothing: the two trees exchange places, so the raw
    weights come back bit-exact (Keras' JAX backend is exact too; its
    TensorFlow backend adds and subtracts).

  Args:
    swap_on_epoch: swap at `on_epoch_end` and back at `on_epoch_begin`.
    which: with several EMA states in the optimizer, which one to swap in
      (as in `ema_jax.swap`).
    index: when that state is a `multi_ema` (e.g.
      `ema_jax.posthoc.Snapshotter(...).ema()`), which of its averages to
      swap in (the position of its decay); required then, and an error for a
      single EMA. Swapping back puts the average back where it came from.

  Examples:
    Linen:

    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.array([2.0])},
    ...     tx=optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)))
    >>> state = state.apply_gradients(grads={"w": jnp.array([2.0])})  # params 0, EMA 1
    >>> hook = ema_jax.flax.SwapEMAWeights()
    >>> state = hook.on_test_begin(state)
    >>> state.params  # evaluate with these
    {'w': Array([1.], dtype=float32)}
    >>> state = hook.on_test_end(state)
    >>> state.params
    {'w': Array([0.], dtype=float32)}

    NNX, in place:

    >>> from flax import nnx
    >>> model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)), wrt=nnx.Param)
    >>> grads = nnx.grad(lambda m: m(jnp.ones((1, 1))).sum())(model)
    >>> _ = optimizer.update(model, grads)
    >>> hook.on_test_begin(model, optimizer)
    >>> model.bias[...]  # the EMA: 0.5 * 0 + 0.5 * (0 - 1)
    Array([-0.5], dtype=float32)
    >>> hook.on_test_end(model, optimizer)
    >>> model.bias[...]
    Array([-1.], dtype=float32)
  """

  def __init__(
      self,
      swap_on_epoch: bool = False,
      *,
      which: int | None = None,
      index: int | None = None,
  ):
    if not isinstance(swap_on_epoch, bool):
      raise TypeError(f"`swap_on_epoch` must be a bool, got {swap_on_epoch!r}.")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
      raise TypeError(f"`index` must be an int or None, got {index!r}.")
    self.swap_on_epoch = swap_on_epoch
    self.which = which
    self.index = index

  @overload
  def on_epoch_begin(self, target: State, optimizer: None = None) -> State: ...

  @overload
  def on_epoch_begin(self, target: nnx.Module, optimizer: nnx.Optimizer) -> None: ...

  def on_epoch_begin(
      self,
      target: train_state.TrainState | nnx.Module,
      optimizer: nnx.Optimizer | None = None,
  ) -> train_state.TrainState | None:
    """With `swap_on_epoch=True`, put the raw weights back before training.

    Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.array([2.0])},
    ...     tx=optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)))
    >>> state = state.apply_gradients(grads={"w": jnp.array([2.0])})  # params 0, EMA 1
    >>> hook = ema_jax.flax.SwapEMAWeights(swap_on_epoch=True)
    >>> hook.on_epoch_begin(hook.on_epoch_end(state)).params["w"]  # raw weights
    Array([0.], dtype=float32)
    """
    if not self.swap_on_epoch:
      return _target.unchanged(target)
    return _target.set_form(target, optimizer, self.which, ema_in=False, index=self.index)

  @overload
  def on_epoch_end(self, target: State, optimizer: None = None) -> State: ...

  @overload
  def on_epoch_end(self, target: nnx.Module, optimizer: nnx.Optimizer) -> None: ...

  def on_epoch_end(
      self,
      target: train_state.TrainState | nnx.Module,
      optimizer: nnx.Optimizer | None = None,
  ) -> train_state.TrainState | None:
    """With `swap_on_epoch=True`, leave the EMA weights in the model.

    A checkpoint written after it holds the EMA weights as params.

    Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.array([2.0])},
    ...     tx=optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)))
    >>> state = state.apply_gradients(grads={"w": jnp.array([2.0])})  # params 0, EMA 1
    >>> ema_jax.flax.SwapEMAWeights(swap_on_epoch=True).on_epoch_end(state).params["w"]
    Array([1.], dtype=float32)
    >>> ema_jax.flax.SwapEMAWeights().on_epoch_end(state).params["w"]  # default: no swap
    Array([0.], dtype=float32)
    """
    if not self.swap_on_epoch:
      return _target.unchanged(target)
    return _target.set_form(target, optimizer, self.which, ema_in=True, index=self.index)

  @overload
  def on_test_begin(self, target: State, optimizer: None = None) -> State: ...

  @overload
  def on_test_begin(self, target: nnx.Module, optimizer: nnx.Optimizer) -> None: ...

  def on_test_begin(
      self,
      target: train_state.TrainState | nnx.Module,
      optimizer: nnx.Optimizer | None = None,
  ) -> train_state.TrainState | None:
    """Put the EMA weights in for evaluation (no-op if they are in).

    Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.array([2.0])},
    ...     tx=optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)))
    >>> state = state.apply_gradients(grads={"w": jnp.array([2.0])})  # params 0, EMA 1
    >>> hook = ema_jax.flax.SwapEMAWeights()
    >>> hook.on_test_begin(hook.on_test_begin(state)).params["w"]  # twice: still the EMA
    Array([1.], dtype=float32)
    """
    return _target.set_form(target, optimizer, self.which, ema_in=True, index=self.index)

  @overload
  def on_test_end(self, target: State, optimizer: None = None) -> State: ...

  @overload
  def on_test_end(self, target: nnx.Module, optimizer: nnx.Optimizer) -> None: ...

  def on_test_end(
      self,
      target: train_state.TrainState | nnx.Module,
      optimizer: nnx.Optimizer | None = None,
  ) -> train_state.TrainState | None:
    """Put the raw weights back after evaluation (no-op if they are in).

    Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.array([2.0])},
    ...     tx=optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)))
    >>> state = state.apply_gradients(grads={"w": jnp.array([2.0])})  # params 0, EMA 1
    >>> hook = ema_jax.flax.SwapEMAWeights()
    >>> hook.on_test_end(hook.on_test_begin(state)).params["w"]
    Array([0.], dtype=float32)
    >>> hook.on_test_end(state).params["w"]  # nothing to restore: unchanged
    Array([0.], dtype=float32)
    """
    return _target.set_form(target, optimizer, self.which, ema_in=False, index=self.index)

  @overload
  def on_predict_begin(self, target: State, optimizer: None = None) -> State: ...

  @overload
  def on_predict_begin(self, target: nnx.Module, optimizer: nnx.Optimizer) -> None: ...

  def on_predict_begin(
      self,
      target: train_state.TrainState | nnx.Module,
      optimizer: nnx.Optimizer | None = None,
  ) -> train_state.TrainState | None:
    """Put the EMA weights in for prediction (no-op if they are in).

    Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.array([2.0])},
    ...     tx=optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)))
    >>> state = state.apply_gradients(grads={"w": jnp.array([2.0])})  # params 0, EMA 1
    >>> ema_jax.flax.SwapEMAWeights().on_predict_begin(state).params["w"]
    Array([1.], dtype=float32)
    """
    return _target.set_form(target, optimizer, self.which, ema_in=True, index=self.index)

  @overload
  def on_predict_end(self, target: State, optimizer: None = None) -> State: ...

  @overload
  def on_predict_end(self, target: nnx.Module, optimizer: nnx.Optimizer) -> None: ...

  def on_predict_end(
      self,
      target: train_state.TrainState | nnx.Module,
      optimizer: nnx.Optimizer | None = None,
  ) -> train_state.TrainState | None:
    """Put the raw weights back after prediction (Keras forgets to).

    Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.array([2.0])},
    ...     tx=optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)))
    >>> state = state.apply_gradients(grads={"w": jnp.array([2.0])})  # params 0, EMA 1
    >>> hook = ema_jax.flax.SwapEMAWeights()
    >>> hook.on_predict_end(hook.on_predict_begin(state)).params["w"]
    Array([0.], dtype=float32)
    """
    return _target.set_form(target, optimizer, self.which, ema_in=False, index=self.index)

  def __repr__(self) -> str:
    return (
        f"SwapEMAWeights(swap_on_epoch={self.swap_on_epoch}, which={self.which}, "
        f"index={self.index})"
    )


@contextlib.contextmanager
def ema_weights(
    target: train_state.TrainState | nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    which: int | None = None,
    index: int | None = None,
) -> Iterator[Any]:
  """Evaluate with the EMA weights inside a `with` block; always swap back.

  With NNX the model is swapped in place on entry and swapped back on exit,
  also when the body raises, so the model leaves the block as it entered (if
  the EMA was already in on entry, nothing is swapped either way). With a
  Linen `TrainState`, which cannot change, it yields the swapped state and
  the state you hold stays untouched.

  Args:
    target: an NNX model, or a Linen `TrainState`.
    optimizer: with NNX, its `nnx.Optimizer`.
    which: with several EMA states, which one (as in `ema_jax.swap`).
    index: for a `multi_ema` state, which of its averages (as in
      `ema_jax.swap`).

  Yields:
    The model (NNX) or the swapped `TrainState` (Linen).

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax import nnx
    >>> model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)), wrt=nnx.Param)
    >>> _ = optimizer.update(model, nnx.grad(lambda m: m(jnp.ones((1, 1))).sum())(model))
    >>> with ema_jax.flax.ema_weights(model, optimizer):
    ...   print(model.bias[...])
    [-0.5]
    >>> model.bias[...]
    Array([-1.], dtype=float32)
  """
  if not _target.is_nnx(target, optimizer):
    yield _target.set_form(target, optimizer, which, ema_in=True, index=index)
    return
  entered_swapped = _target.set_form_in_place(
      target, optimizer, which, ema_in=True, index=index
  )
  try:
    yield target
  finally:
    if not entered_swapped:
      _target.set_form(target, optimizer, which, ema_in=False)
