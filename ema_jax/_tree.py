"""Which leaves are averaged, in which dtype, and checks that name the leaf."""

from __future__ import annotations

import enum
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

MaskOrFn = Union[Any, Callable[[Any], Any], None]


class Kind(enum.Enum):
  AVERAGE = "average"  # floating leaf: the EMA is kept
  CARRY = "carry"  # integer, boolean or PRNG-key leaf: the latest value is kept
  SKIP = "skip"  # excluded by `mask`: nothing is kept


def path_str(path: Sequence[Any]) -> str:
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def _dtype(x: Any) -> np.dtype:
  return jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype


def is_float(x: Any) -> bool:
  dtype = _dtype(x)
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return False
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def ema_dtype_for(param_dtype: Any, ema_dtype: Any) -> np.dtype:
  """float32 for float16/bfloat16 (and narrower) params unless `ema_dtype` says."""
  if ema_dtype is not None:
    return np.dtype(ema_dtype)
  param_dtype = np.dtype(param_dtype)
  if jnp.issubdtype(param_dtype, jnp.complexfloating):
    return param_dtype
  if jnp.finfo(param_dtype).bits < 32:
    return np.dtype(jnp.float32)
  return param_dtype


def expand_mask(mask: MaskOrFn, params: Any) -> list[bool]:
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


def leaf_kinds(params: Any, mask: MaskOrFn) -> list[Kind]:
  flags = expand_mask(mask, params)
  kinds = []
  for leaf, flag in zip(jax.tree.leaves(params), flags):
    if not is_float(leaf):
      kinds.append(Kind.CARRY)
    elif flag:
      kinds.append(Kind.AVERAGE)
    else:
      kinds.append(Kind.SKIP)
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
    where = _differences(params, tree, name) or str(e)
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


def check_leaves(
    paths: Sequence[Any],
    params: Sequence[Any],
    stored: Sequence[Any],
    kinds: Sequence[Kind],
    ema_dtype: Any,
    what: str,
) -> None:
  """Shapes and dtypes of `params` against what the state holds, by leaf path."""
  for path, p, s, kind in zip(paths, params, stored, kinds):
    where = path_str(path)
    if kind is Kind.SKIP:
      if s is not None:
        raise ValueError(
            f"Leaf {where}: `mask` excludes it but the {what} holds a value "
            "for it. The mask must be the same at `init` and `update`."
        )
      continue
    if s is None:
      raise ValueError(
          f"Leaf {where}: the {what} holds nothing for it (it was excluded by "
          "`mask` at `init`, or was None). Use the same mask and params "
          "structure at `init` and `update`."
      )
    if jnp.shape(p) != jnp.shape(s):
      raise ValueError(
          f"Leaf {where}: params have shape {jnp.shape(p)} but the {what} has "
          f"shape {jnp.shape(s)}. Re-run `init` after changing the model."
      )
    expected = (
        ema_dtype_for(_dtype(p), ema_dtype) if kind is Kind.AVERAGE else _dtype(p)
    )
    if _dtype(s) != expected:
      raise ValueError(
          f"Leaf {where}: params of dtype {_dtype(p)} need an {what} of dtype "
          f"{expected}, but it holds {_dtype(s)}. Re-run `init` after changing "
          "the params' dtype (or pass `ema_dtype`)."
      )
