"""Orbax checkpoints that resume exactly, whichever form they were written in."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import jax
import jax.numpy as jnp
from flax import nnx
from flax.training import train_state

from ema_jax import posthoc
from ema_jax.flax import _hook
from ema_jax.flax import _linen
from ema_jax.flax import _nnx
from ema_jax.flax import _restore
from ema_jax.flax import _target

if TYPE_CHECKING:
  from orbax.checkpoint import CheckpointManager

State = TypeVar("State", bound=train_state.TrainState)


def _fill(values: dict[str, Any], fresh: dict[str, Any]) -> None:
  # Only the leaves the checkpoint did not have: the new EMA states.
  for name, value in fresh.items():
    values.setdefault(name, value)


def _nnx_item(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
  return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def save_checkpoint(
    manager: CheckpointManager,
    step: int,
    target: train_state.TrainState | nnx.Module,
    optimizer: nnx.Optimizer | None = None,
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
    What `manager.save` returns: whether a checkpoint was saved (with an
    asynchronous manager: started, in a directory checked to take files
    just before; a write that fails in the background is raised by the next
    `save_checkpoint`, or by `manager.wait_until_finished()`).

  Raises:
    ValueError: when two leaves would have one name in the checkpoint (Orbax
      joins keys with dots: `"a.b"` and `a/b`), naming both.
    RuntimeError: when this checkpoint, or an earlier asynchronous one,
      could not be written: the message names the step, the directory and
      the cause.

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

  item: Any = target
  if _target.is_nnx(target, optimizer):
    item = _nnx_item(cast(nnx.Module, target), cast(nnx.Optimizer, optimizer))
  posthoc._check_orbax_names(item, f"Cannot checkpoint step {step}")
  where = f"The checkpoint of step {step}"
  # An earlier write that failed in Orbax's thread, once it is over (one
  # under way is waited for by Orbax's own save, and raised there).
  _check_earlier(manager, lambda: posthoc._raise_background_error(manager, wait=False))
  try:
    if "://" not in str(manager.directory):
      # Orbax creates the step's directory in the background: a local
      # directory that cannot take it fails here, before the save is reported.
      with tempfile.TemporaryFile(dir=manager.directory):
        pass
    return manager.save(step, args=ocp.args.StandardSave(item), **kwargs)
  except OSError as e:
    raise posthoc._failed_save(str(manager.directory), where, e) from e


def _check_earlier(manager: Any, check: Any) -> None:
  """Raise the failure of an earlier asynchronous save, naming the directory."""
  try:
    check()
  except Exception as e:
    raise posthoc._failed_save(
        str(manager.directory), "An earlier asynchronous checkpoint", e
    ) from e


@overload
def restore_checkpoint(
    manager: CheckpointManager,
    target: State,
    optimizer: None = None,
    *,
    step: int | None = None,
    which: int | None = None,
    missing_ema: _restore.MissingEma = "error",
) -> State: ...


@overload
def restore_checkpoint(
    manager: CheckpointManager,
    target: nnx.Module,
    optimizer: nnx.Optimizer,
    *,
    step: int | None = None,
    which: int | None = None,
    missing_ema: _restore.MissingEma = "error",
) -> None: ...


def restore_checkpoint(
    manager: CheckpointManager,
    target: train_state.TrainState | nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    step: int | None = None,
    which: int | None = None,
    missing_ema: _restore.MissingEma = "error",
) -> train_state.TrainState | None:
  """Restore a training state, checked by name, with the raw weights in the model.

  The checkpoint's leaves (names, shapes, dtypes, read from its metadata) are
  compared with the template's before any array is read. A difference is
  refused with a `ValueError` naming the EMA setting (`debias`, `ema_dtype`,
  `rounding`, the number of averages, the mask) or the leaf, and the fix;
  nothing is ever cast, dropped or filled in silently.

  A checkpoint written while the EMA was swapped in
  (`SwapEMAWeights(swap_on_epoch=True)`) holds the EMA in the params and the
  raw weights in the state's `raw_params`: the model is restored from
  `raw_params`, so a resumed run continues from its training weights with the
  EMA, its step counter and its decay schedule exactly where they were,
  whichever form (and, for a `multi_ema` state, whichever average) it was
  saved in.

  Enabling the EMA mid-run: a checkpoint written without any EMA state (the
  optimizer was `inner`), restored into a template whose optimizer is
  `optax.chain(inner, <EMA>)`, is refused unless `missing_ema="init"`; then
  the params, the step and the inner optimizer state come back exactly and
  every EMA state (the statistics' one too) starts as a copy of the restored
  values, with count 0.

  Args:
    manager: the `orbax.checkpoint.CheckpointManager` it was saved with
      (by `save_checkpoint`).
    target: a Linen `TrainState` to use as the template (concrete in either
      form, or abstract in the raw form: `jax.eval_shape` of the function
      building it), or an NNX model to restore in place (concrete, or from
      `nnx.eval_shape`).
    optimizer: with NNX, its `nnx.Optimizer` (restored in place).
    step: the step to restore; the latest by default.
    which: with several EMA states, which one the hook swaps (only used to
      swap a concrete swapped template back first).
    missing_ema: `"error"` (the default) refuses a checkpoint without the
      template's EMA states; `"init"` starts them from the restored params.

  Returns:
    The restored `TrainState` (Linen), or `None` (NNX, restored in place).

  A checkpoint still being written asynchronously is waited for first.

  Raises:
    FileNotFoundError: no checkpoint in `manager`, or none of `step` (the
      message lists the steps there).
    ValueError: the checkpoint does not fit the template, or is not one
      `save_checkpoint` writes (another Orbax layout: `PyTreeSave`,
      `Composite`; the message names the items found).

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

    Turning the EMA on when resuming a run that had none:

    >>> plain = TrainState.create(apply_fn=None, params={"w": jnp.array([3.0])},
    ...                           tx=optax.sgd(1.0))
    >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> ema_jax.flax.save_checkpoint(manager, 0, plain)
    True
    >>> manager.wait_until_finished()
    >>> restored = ema_jax.flax.restore_checkpoint(manager, state, missing_ema="init")
    >>> restored.params["w"], restored.opt_state[1].count, restored.opt_state[1].ema["w"]
    (Array([3.], dtype=float32), Array(0, dtype=int32), Array([3.], dtype=float32))
  """
  # A save still being written asynchronously is finished first (as Orbax's
  # own restore does), so that it can be read and its metadata checked.
  _check_earlier(manager, manager.wait_until_finished)
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(
          f"No checkpoint in {manager.directory}; nothing to restore."
      )
  where = f"The checkpoint at step {step} in {manager.directory}"
  saved_tree = _restore.saved_tree(manager, step)
  saved = _restore.saved_specs(saved_tree)

  nnx_target = _target.is_nnx(target, optimizer)
  # Narrowed by `is_nnx`: an NNX model with its optimizer, or a Linen state.
  model, nnx_optimizer = cast(nnx.Module, target), cast(nnx.Optimizer, optimizer)
  if nnx_target:
    _target.set_form(model, nnx_optimizer, which, ema_in=False)
    item: Any = _nnx_item(model, nnx_optimizer)
    layout = _nnx.layout(nnx_optimizer)
  else:
    item = _target.set_form(target, None, which, ema_in=False)
    layout = _linen.layout(item)
  template = _restore.named_leaves(item)
  found = [a for prefix, root, tree in layout
           for a in _restore.averages(tree, prefix, root)]
  opt_prefix, _, opt_state = layout[0]
  suffix = ".value" if nnx_target else ""
  source = _restore.plan(
      saved, template, found,
      _restore.without_ema(opt_state, opt_prefix, suffix),
      missing_ema, where,
  )
  values = _restore.read(manager, step, saved_tree, template, source)
  treedef = jax.tree.structure(item)

  def rebuilt() -> Any:
    return jax.tree.unflatten(treedef, [values.get(n, template[n]) for n in template])

  def check_filled() -> None:
    # Every leaf comes from the checkpoint or a fresh EMA, never the template.
    unfilled = [n for n in template if n not in values]
    if unfilled:
      raise ValueError(
          f"{where}: `missing_ema=\"init\"` could not start "
          f"{', '.join(f'`{n}`' for n in unfilled[:5])} from the restored "
          "params (the optimizer's `init` gives other leaves); restore "
          'without `missing_ema="init"` into the chain the checkpoint was '
          "written with."
      )

  if not nnx_target:
    if len(values) < len(template):  # missing_ema="init": EMA from the params
      _fill(values, _linen.fresh_ema(rebuilt()))
      check_filled()
    return rebuilt()
  if len(values) < len(template):
    nnx.update(model, rebuilt()["model"])
    _fill(values, _nnx.fresh_ema(model, nnx_optimizer))
    check_filled()
  restored = rebuilt()
  nnx.update(model, restored["model"])
  nnx.update(nnx_optimizer, restored["optimizer"])
  return None


def _copy(tree: Any) -> Any:
  # The export must outlive the training state: a train step that donates
  # the optimizer state would otherwise delete the exported buffers.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


@overload
def export_ema(
    target: train_state.TrainState,
    optimizer: None = None,
    *,
    which: int | None = None,
    index: int | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> dict[str, Any]: ...


@overload
def export_ema(
    target: nnx.Module,
    optimizer: nnx.Optimizer,
    *,
    which: int | None = None,
    index: int | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> nnx.Module: ...


def export_ema(
    target: train_state.TrainState | nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    which: int | None = None,
    index: int | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> dict[str, Any] | nnx.Module:
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
  exported: Any
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
