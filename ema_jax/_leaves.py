"""The one decision of what each leaf is (averaged, carried, not covered), its
dtype, and the alignment and checks of stored trees against the params, by
leaf path."""

from __future__ import annotations

import enum
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

Mask = Union[Any, Callable[[Any], Any], None]

# What a leaf of the params may be: arrays and numbers (optax treats Python
# scalars as arrays of their default dtype).
_ARRAY_LIKE = (jax.Array, np.ndarray, np.generic, int, float, complex)


class Kind(enum.Enum):
  AVERAGE = "average"  # floating leaf: the EMA is kept
  CARRY = "carry"  # integer, boolean or PRNG-key leaf: the latest value is kept
  SKIP = "skip"  # excluded by `mask`: nothing is kept


def path_str(path: Sequence[Any]) -> str:
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def leaf_dtype(x: Any) -> np.dtype:
  """The dtype of a leaf as JAX holds it: Python scalars as optax gives them,
  NumPy float64 as float32 when x64 is off (JAX converts them so)."""
  if not hasattr(x, "dtype"):
    return jnp.asarray(x).dtype
  if isinstance(x, (np.ndarray, np.generic)):
    return jax.dtypes.canonicalize_dtype(x.dtype)
  return x.dtype


def is_float(x: Any) -> bool:
  dtype = leaf_dtype(x)
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return False
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def ema_dtype_for(
    param_dtype: Any, ema_dtype: Any, path: Sequence[Any] = ()
) -> np.dtype:
  """float32 for float16/bfloat16 (and narrower) params unless `ema_dtype` says.

  An `ema_dtype` that is complex for a real leaf, or real for a complex one,
  is refused, naming the leaf: a real average of complex params would drop
  their imaginary part.
  """
  param_dtype = np.dtype(param_dtype)
  if ema_dtype is not None:
    ema_dtype = np.dtype(ema_dtype)
    complex_param = jnp.issubdtype(param_dtype, jnp.complexfloating)
    if complex_param != jnp.issubdtype(ema_dtype, jnp.complexfloating):
      fix = (
          "pass a complex `ema_dtype` (complex64/complex128) or None"
          if complex_param else "pass a real float `ema_dtype` or None"
      )
      raise ValueError(
          f"Leaf {path_str(path)} is {param_dtype} but `ema_dtype` is "
          f"{ema_dtype}: the average would "
          f"{'drop the imaginary part' if complex_param else 'be complex'}. "
          f"Average complex leaves in a complex dtype: {fix}, or exclude the "
          "leaf with `mask`."
      )
    return ema_dtype
  if jnp.issubdtype(param_dtype, jnp.complexfloating):
    return param_dtype
  if jnp.finfo(param_dtype).bits < 32:
    return np.dtype(jnp.float32)
  return param_dtype


def compute_dtype(dtype: Any) -> np.dtype:
  """The dtype to average in: float32 or wider, never narrower than `dtype`.

  Chosen explicitly: under strict dtype promotion there is no implicit path
  from bfloat16 or float16 to float32.
  """
  dtype = np.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else np.dtype(jnp.float32)


def expand_mask(mask: Mask, params: Any) -> list[bool]:
  """One Python bool per leaf of `params`; `mask` may be a prefix tree or callable."""
  n = len(jax.tree.leaves(params))
  if mask is None:
    return [True] * n
  mask_tree = mask(params) if callable(mask) else mask
  mask_def: Any = jax.tree.structure(mask_tree)
  try:
    subtrees = mask_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "`mask` must be a tree of bools with the structure of the params (or a "
        "prefix of it), or a callable returning one; its structure "
        f"{mask_def} does not match the params': {e}"
    ) from None
  flags: list[bool] = []
  for path_leaf, sub in zip(
      jax.tree_util.tree_flatten_with_path(mask_tree)[0], subtrees
  ):
    path, flag = path_leaf
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(
          f"`mask` leaf at {path_str(path)} is {flag!r}; mask leaves must be "
          "Python bools (a mask is static: it decides which leaves have an EMA)."
      )
    flags.extend([bool(flag)] * len(jax.tree.leaves(sub)))
  return flags


def is_uncovered(stored: Any) -> bool:
  """A stored value that stands for a leaf the EMA does not cover.

  `None` where `mask` excludes a leaf; `optax.MaskedNode` where the EMA runs
  inside `optax.masked` or `optax.multi_transform` and never sees the leaf.
  """
  return stored is None or isinstance(stored, optax.MaskedNode)


def stored_kind(stored: Any) -> Kind:
  """The kind of a leaf, read from what an EMA state stores for it."""
  if is_uncovered(stored):
    return Kind.SKIP
  return Kind.AVERAGE if is_float(stored) else Kind.CARRY


def leaf_kind(path: Sequence[Any], leaf: Any, covered: bool) -> Kind:
  """What the EMA does with one leaf: the only place that decides it."""
  if not isinstance(leaf, _ARRAY_LIKE) or isinstance(leaf, str):
    raise TypeError(
        f"Leaf {path_str(path)} of the params is a {type(leaf).__name__}, not "
        "an array: an EMA averages arrays only. Pass the arrays of your model "
        "alone (for Equinox: `eqx.filter(model, eqx.is_array)`; for Flax NNX: "
        "`nnx.state(model, nnx.Param)`)."
    )
  if not covered:
    return Kind.SKIP
  return Kind.AVERAGE if is_float(leaf) else Kind.CARRY


def leaf_kinds(params: Any, mask: Mask) -> list[Kind]:
  """The kind of every leaf of `params` under `mask`, in leaf order."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flags = expand_mask(mask, params)
  kinds = []
  for (path, leaf), flag in zip(flat, flags):
    kind = leaf_kind(path, leaf, True)
    # `mask` excludes floating leaves only; others are always carried.
    kinds.append(Kind.SKIP if kind is Kind.AVERAGE and not flag else kind)
  return kinds


def _differences(params: Any, tree: Any, name: str) -> str:
  """Where two trees differ, as leaf paths (None kept as a leaf)."""

  def paths(x: Any) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda v: v is None)[0]
    return {path_str(path) for path, _ in flat}

  only_params = sorted(paths(params) - paths(tree))[:3]
  only_tree = sorted(paths(tree) - paths(params))[:3]
  parts = []
  if only_params:
    parts.append(f"missing from {name}: {', '.join(only_params)}")
  if only_tree:
    parts.append(f"not in params: {', '.join(only_tree)}")
  return "; ".join(parts)


def flatten_like(params_def: Any, tree: Any, what: str) -> list[Any]:
  """Leaves of `tree` aligned with the leaves of `params_def` (None kept)."""
  try:
    return params_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    params = jax.tree.unflatten(params_def, [0] * params_def.num_leaves)
    name = "updates" if what == "updates" else f"the {what}"
    # Never the error's own text: under jit it prints tracers, not structure.
    where = _differences(params, tree, name) or (
        "the same leaf paths in other containers: params are "
        f"{params_def}, {name} {jax.tree.structure(tree, is_leaf=lambda v: v is None)}"
    )
    if what == "updates":
      message = (
          "`updates` do not have the structure of `params` "
          f"({where}). Pass the updates (gradients) for these params."
      )
    else:
      message = (
          f"`params` do not have the structure of the {what} ({where}). Pass "
          "the same params tree (same keys, same containers) that was given "
          "to `init`, or re-run `init` after changing the model."
      )
    raise ValueError(message) from None


def check_stored(
    path: Sequence[Any],
    param: Any,
    stored: Any,
    kind: Kind,
    what: str,
    *,
    num_averages: int | None = None,
    dtype: Any = None,
    number_kind: bool = False,
) -> None:
  """One stored leaf against its param, by leaf path: the one mismatch message.

  Args:
    path: the leaf's path in the params.
    param: the params' leaf.
    stored: what the state holds for it.
    kind: the leaf's kind.
    what: the stored tree's name in messages.
    num_averages: for a stacked (multi-EMA) tree, how many averages an
      averaged leaf must hold on its leading axis.
    dtype: the dtype the stored leaf must have; `None` checks no dtype.
    number_kind: also check that the param is a number of the stored leaf's
      kind: a carried leaf's dtype exactly, and for an averaged leaf a real
      or complex float as stored (an average may be kept in another float
      dtype than its param's).
  """
  where = path_str(path)
  if kind is Kind.SKIP:
    if not is_uncovered(stored):
      raise ValueError(
          f"Leaf {where}: `mask` excludes it but the {what} holds a value "
          "for it. The mask must be the same at `init` and `update`."
      )
    return
  if is_uncovered(stored):
    raise ValueError(
        f"Leaf {where}: the {what} holds nothing for it (it was excluded by "
        "`mask` at `init`). Use the same mask and params structure at `init` "
        "and `update`."
    )
  shape = tuple(jnp.shape(stored))
  if num_averages is not None and kind is Kind.AVERAGE:
    if shape[:1] != (num_averages,):
      raise ValueError(
          f"Leaf {where}: the {what} holds "
          f"{shape[0] if shape else 'no'} stacked averages, but this "
          f"transformation has {num_averages} decays. Re-run `init` after "
          "changing `decays`."
      )
    shape = shape[1:]
  if tuple(jnp.shape(param)) != shape:
    raise ValueError(
        f"Leaf {where}: params have shape {jnp.shape(param)} but the {what} "
        f"holds shape {shape}. Pass the params the state was made for, or "
        "re-run `init` after changing the model."
    )
  if dtype is not None and leaf_dtype(stored) != dtype:
    raise ValueError(
        f"Leaf {where}: params of dtype {leaf_dtype(param)} need the {what} to "
        f"hold dtype {dtype}, but it holds {leaf_dtype(stored)}. Re-run `init` "
        "after changing the params' dtype (or pass `ema_dtype`)."
    )
  if number_kind and _number_kind(param, kind) != _number_kind(stored, kind):
    raise ValueError(
        f"Leaf {where}: params of dtype {leaf_dtype(param)} do not match the "
        f"{what}, which holds dtype {leaf_dtype(stored)} for it. Pass the "
        "params the state was made for, or re-run `init` after changing the "
        "params' dtype."
    )


def _number_kind(x: Any, kind: Kind) -> Any:
  """What must agree between a param and its stored leaf, beyond the shape."""
  dtype = leaf_dtype(x)
  if kind is Kind.CARRY or not is_float(x):
    return dtype
  return jnp.issubdtype(dtype, jnp.complexfloating)


def describe(tree: Any, *, stacked: bool) -> list[list[Any]]:
  """`[path, kind, shape, dtype]` of every leaf of a stored tree, JSON-ready.

  The record by which stored trees are compared (and written next to them):
  leaves excluded by `mask` (`None`) are kept, with no shape or dtype. With
  `stacked`, averaged leaves hold the averages on a leading axis, which is
  left out of the shape.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  out: list[list[Any]] = []
  for path, leaf in flat:
    kind = stored_kind(leaf)
    if kind is Kind.SKIP:
      out.append([path_str(path), kind.value, None, None])
      continue
    shape = list(jnp.shape(leaf))
    if stacked and kind is Kind.AVERAGE:
      shape = shape[1:]
    out.append([path_str(path), kind.value, shape, str(leaf_dtype(leaf))])
  return out


def first_difference(
    a: list[list[Any]], b: list[list[Any]], a_name: str, b_name: str,
    *, fields: Sequence[str] = ("kind", "shape", "dtype"),
) -> str | None:
  """The first leaf path at which two `describe` records differ, in words."""
  rows = [{row[0]: row for row in record} for record in (a, b)]
  for record, other, here, there in (
      (a, rows[1], a_name, b_name), (b, rows[0], b_name, a_name)
  ):
    for row in record:
      if row[0] not in other:
        return f"leaf {row[0]} is in {here} but not in {there}"
  if [row[0] for row in a] != [row[0] for row in b]:
    return f"the leaves are in another order in {a_name} than in {b_name}"
  index = {"kind": 1, "shape": 2, "dtype": 3}
  for row in a:
    match = rows[1][row[0]]
    for field in fields:
      mine, theirs = row[index[field]], match[index[field]]
      if mine != theirs:
        show = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        return (
            f"leaf {row[0]} has {field} {show(mine)} in {a_name} but "
            f"{show(theirs)} in {b_name}"
        )
  return None
