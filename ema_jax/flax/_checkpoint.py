"""Orbax checkpoints that resume exactly, whichever form they were written in."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ema_jax.flax import _form
from ema_jax.flax import _hook
from ema_jax.flax import _linen
from ema_jax.flax import _target


def _restore_either(manager: Any, step: int, raw: Any, ema_in: Any) -> tuple[Any, bool]:
  """Restore into the raw-form template, else the swapped one; say which fit."""
  import orbax.checkpoint as ocp

  try:
    return manager.restore(step, args=ocp.args.StandardRestore(raw)), False
  except ValueError as raw_error:
    # The forms differ in one key (`ema` / `raw_params`), so at most one
    # template fits; if neither does, Orbax's message for the raw form says why.
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(ema_in)), True
    except ValueError:
      raise raw_error from None


def _nnx_item(model: nnx.Module, optimizer: Any) -> dict[str, Any]:
  return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def save_checkpoint(
    manager: Any,
    step: int,
    target: Any,
    optimizer: Any = None,
    **kwargs: Any,
) -> bool:
  """Save a training state with an `orbax.checkpoint.CheckpointManager`.

  For a Linen `TrainState` this is `manager.save(step,
  args=ocp.args.StandardSave(state))`; for NNX it saves
  `{"model": nnx.state(model), "optimizer": nnx.state(optimizer)}`, the
  layout `restore_checkpoint` reads. The EMA state is saved
  with everything else: its step counter, and so where its decay schedule is.

  Saving while the EMA is swapped in (`SwapEMAWeights(swap_on_epoch=True)`) is
  allowed and loses nothing: the params then hold the EMA and the optimizer
  state holds the raw weights under the key `raw_params` instead of `ema`.

  Args:
    manager: an `orbax.checkpoint.CheckpointManager` with a single item (the
      default).
    step: the step to save under.
    target: a Linen `TrainState`, or an NNX model.
    optimizer: with NNX, its `nnx.Optimizer`.
    **kwargs: passed to `manager.save` (e.g. `force=True`).

  Returns:
    What `manager.save` returns: whether a checkpoint was saved.

  Examples:
    >>> import tempfile, jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> import orbax.checkpoint as ocp
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params=jnp.zeros(2),
    ...                           tx=optax.chain(optax.sgd(0.1), ema_jax.ema()))
    >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> ema_jax.flax.save_checkpoint(manager, 0, state)
    True
    >>> manager.wait_until_finished()
  """
  import orbax.checkpoint as ocp

  if _target.is_nnx(target, optimizer):
    item = _nnx_item(target, optimizer)
  else:
    item = target
  return manager.save(step, args=ocp.args.StandardSave(item), **kwargs)


def restore_checkpoint(
    manager: Any,
    target: Any,
    optimizer: Any = None,
    *,
    step: int | None = None,
    which: int | None = None,
) -> Any:
  """Restore a training state, always with the raw (training) weights in the model.

  A checkpoint written while the EMA was swapped in has `raw_params` where an
  unswapped one has `ema`, so restoring it with plain Orbax into a training
  template fails on the tree mismatch instead of loading the EMA as training
  weights. This helper restores it in whichever form it was written in (the
  template in the other form does not fit) and swaps back when needed, so a resumed run continues
  from the raw weights with the EMA, its step counter and its decay schedule
  exactly where they were. (Had some other route loaded a swapped state, the
  first training step would fail: `update` refuses a `SwappedEmaState`.)
  A `multi_ema` state (e.g. `ema_jax.posthoc.Snapshotter(...).ema()`) works
  the same, whichever of its averages was swapped in when it was saved.

  Args:
    manager: the `orbax.checkpoint.CheckpointManager` it was saved with.
    target: a Linen `TrainState` to use as the template (concrete or from
      `jax.eval_shape`; in either form), or an NNX model to restore in place.
    optimizer: with NNX, its `nnx.Optimizer` (restored in place).
    step: the step to restore; the latest by default.
    which: with several EMA states, which one the hook swaps.

  Returns:
    The restored `TrainState` (Linen), or `None` (NNX, restored in place).

  Raises:
    FileNotFoundError: no checkpoint in `manager`.

  Examples:
    >>> import tempfile, jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> import orbax.checkpoint as ocp
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.array([2.0])},
    ...                           tx=optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)))
    >>> state = state.apply_gradients(grads={"w": jnp.array([2.0])})  # params 0, EMA 1
    >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> swapped = ema_jax.flax.SwapEMAWeights().on_test_begin(state)
    >>> ema_jax.flax.save_checkpoint(manager, 1, swapped)  # EMA in the params
    True
    >>> manager.wait_until_finished()
    >>> restored = ema_jax.flax.restore_checkpoint(manager, state)
    >>> restored.params["w"], ema_jax.ema_params(restored.opt_state)["w"]  # raw back
    (Array([0.], dtype=float32), Array([1.], dtype=float32))
  """
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(
          f"No checkpoint in {manager.directory}; nothing to restore."
      )

  if not _target.is_nnx(target, optimizer):
    raw = _target.set_form(target, None, which, ema_in=False)
    index = _form.template_index(raw.opt_state, which)
    restored, was_swapped = _restore_either(
        manager, step, raw, _linen.toggle(raw, which, index)
    )
    # Swapping back reads the index of the average out from the checkpoint.
    return _linen.toggle(restored, which) if was_swapped else restored

  model = target
  _target.set_form(model, optimizer, which, ema_in=False)
  index = _form.template_index(nnx.as_pure(optimizer.opt_state), which)
  raw_item = _nnx_item(model, optimizer)
  with _hook.ema_weights(model, optimizer, which=which, index=index):
    ema_item = _nnx_item(model, optimizer)
  restored, was_swapped = _restore_either(manager, step, raw_item, ema_item)
  if was_swapped:  # take the swapped structure, fill it, then swap back
    _target.set_form(model, optimizer, which, ema_in=True, index=index)
  nnx.update(model, restored["model"])
  nnx.update(optimizer, restored["optimizer"])
  _target.set_form(model, optimizer, which, ema_in=False)
  return None


def _copy(tree: Any) -> Any:
  # The export must outlive the training state: a train step that donates
  # the optimizer state would otherwise delete the exported buffers.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def export_ema(
    target: Any,
    optimizer: Any = None,
    *,
    which: int | None = None,
    index: int | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> Any:
  """The EMA weights alone, ready for inference (and written to disk if asked).

  The counterpart of Keras' `finalize_variable_values` and TensorFlow Addons'
  `assign_average_vars`, without touching the training state: it returns a
  copy. Non-parameter state comes along: its EMA when it is averaged
  (`average_stats=` of `ema_jax.flax.TrainState` or `ema_jax.flax.Optimizer`),
  else its current value, as in Keras.

  Args:
    target: a Linen `TrainState`, or an NNX model.
    optimizer: with NNX, its `nnx.Optimizer`.
    which: with several EMA states, which one.
    index: for a `multi_ema` state, which of its averages (required then).
    directory: if given, also write the exported weights there with
      `orbax.checkpoint.StandardCheckpointer` (it must not exist yet).

  Returns:
    Linen: a variables dict, `{"params": ...}` plus `"batch_stats"` when the
    state has them, for `model.apply`. NNX: a new model holding the EMA
    weights (the training model is left as it was).

  Examples:
    >>> import jax.numpy as jnp, optax, ema_jax, ema_jax.flax
    >>> from flax.training.train_state import TrainState
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.array([2.0])},
    ...                           tx=optax.chain(optax.sgd(1.0), ema_jax.ema(0.5)))
    >>> state = state.apply_gradients(grads={"w": jnp.array([2.0])})
    >>> ema_jax.flax.export_ema(state)
    {'params': {'w': Array([1.], dtype=float32)}}
  """
  if _target.is_nnx(target, optimizer):
    with _hook.ema_weights(target, optimizer, which=which, index=index):
      graphdef, state = nnx.split(target)
      exported = nnx.merge(graphdef, _copy(state))
    item: Any = nnx.state(exported)
  else:
    ema_in = _target.set_form(target, None, which, ema_in=True, index=index)
    exported = {"params": _copy(ema_in.params)}
    if getattr(ema_in, "batch_stats", None) is not None:
      exported["batch_stats"] = _copy(ema_in.batch_stats)
    item = exported
  if directory is not None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.abspath(directory), item)
      checkpointer.wait_until_finished()
  return exported
