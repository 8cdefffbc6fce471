"""Restoring by leaf name: the checkpoint is checked against the template first.

A checkpoint and a template are compared as maps from leaf names (Orbax's
own dotted names: `opt_state.1.ema.w`) to shapes and dtypes, read from the
checkpoint's metadata before any array is. Every template leaf gets the
name of the saved leaf it is read from:

- the same name, normally;
- in a checkpoint written while the EMA was swapped in, the raw weights'
  copy (`<ema state>.raw_params.<leaf>`) for each swapped parameter, so the
  model always comes back with its training weights, in any form and from
  abstract templates alike (nothing is swapped to restore);
- with `missing_ema="init"` and a checkpoint written before the EMA was
  added to the chain, the name the leaf had in the chain without the EMA,
  and none for the EMA's leaves (they start as a copy of the params).

Anything else (a leaf only on one side, another shape or dtype) is refused
with the leaf's name and, for an EMA state, the setting that differs. Orbax
then restores exactly the names that were matched, never casting.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Iterable, Literal, Mapping

import jax
import numpy as np

from ema_jax import _state
from ema_jax import posthoc
from ema_jax.posthoc import _key_name as key_name

MissingEma = Literal["error", "init"]
_LIMIT = 12  # problems listed in a message


def named_leaves(tree: Any, prefix: str = "", suffix: str = "", **kw: Any) -> dict[str, Any]:
  """`{"prefix.a.0.b" + suffix: leaf}` in the tree's leaf order.

  Raises ValueError when two leaves have one name (`"a.b"` and `a/b`).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree, **kw)[0]
  out = {
      ".".join([prefix, *map(key_name, path)] if prefix else map(key_name, path))
      + suffix: leaf
      for path, leaf in flat
  }
  if len(out) < len(flat):
    posthoc._check_orbax_names(tree, "This training state cannot be checkpointed")
  return out


@dataclasses.dataclass(frozen=True)
class Average:
  """An EMA state in the template: where it is and what it averages."""

  prefix: str  # its name, e.g. "opt_state.1"
  root: str  # the name of the tree it averages, e.g. "params"
  state: Any  # the template's state (for its settings)

  def owns(self, name: str) -> bool:
    return name.startswith(self.prefix + ".")

  def field(self, name: str) -> str:
    return name[len(self.prefix) + 1 :].split(".")[0]

  def raw_name(self, name: str) -> str | None:
    """Where a swapped checkpoint keeps the raw value of template leaf `name`."""
    if name == self.root:  # the params are one array
      return f"{self.prefix}.raw_params"
    if name.startswith(self.root + "."):
      return f"{self.prefix}.raw_params.{name[len(self.root) + 1:]}"
    return None

  def internal(self, name: str) -> bool:
    """Whether saved leaf `name` is this state's swapped-only bookkeeping."""
    return any(
        name == f"{self.prefix}.{field}" or name.startswith(f"{self.prefix}.{field}.")
        for field in ("raw_params", "index")
    )


def averages(opt_state: Any, prefix: str, root: str) -> list[Average]:
  """The EMA states in an optax state, named under `prefix`."""
  found = named_leaves(opt_state, prefix, is_leaf=_state.is_state)
  return [Average(name, root, s) for name, s in found.items() if _state.is_state(s)]


def _dtype(dtype: Any) -> str | None:
  return None if dtype is None else str(dtype)  # PRNG keys have no NumPy dtype


def _spec(leaf: Any) -> tuple[tuple[int, ...], str | None]:
  """A template leaf's (shape, dtype) as Orbax saves it (a key as its data)."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
    dtype = leaf.dtype
  return tuple(getattr(leaf, "shape", np.shape(leaf))), _dtype(dtype)


def _show(spec: tuple[tuple[int, ...], Any]) -> str:
  shape, dtype = spec
  return f"{dtype if dtype is not None else 'scalar'}{list(shape)}"


def _same(a: Any, b: Any) -> bool:
  (sa, da), (sb, db) = a, b
  return sa == sb and (da is None or db is None or da == db)


def _children(tree: Any) -> tuple[list[Any], Any] | None:
  """A pytree node's children and how to rebuild it; `None` for a leaf."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is not tree)
  if jax.tree_util.treedef_is_leaf(treedef):  # `tree` is a leaf itself
    return None
  return leaves, treedef


def _strip(tree: Any) -> list[Any]:
  """`tree` with the EMA states left out of its chains, every way a chain
  without them can look (a chain of one element is that element's state),
  inside any wrapper's state (`MultiSteps`, `apply_if_finite`, `masked`,
  `multi_transform`, `inject_hyperparams`): the wrapper then wraps the chain
  without the EMA."""
  out: list[Any] = []
  if type(tree) is tuple:  # a chain
    for combo in itertools.product(*map(_strip, tree)):
      kept = tuple(x for x in combo if x is not None)
      out.append(kept)
      if len(kept) == 1:
        out.append(kept[0])
    return out
  if _state.is_state(tree):
    return [None]
  leaves = jax.tree.leaves(tree, is_leaf=_state.is_state)
  node = _children(tree)
  if node is None or not any(map(_state.is_state, leaves)):
    return [tree]
  children, treedef = node
  out = [
      jax.tree.unflatten(treedef, combo)
      for combo in itertools.product(*map(_strip, children))
      if all(c is not None for c in combo)  # a wrapper of nothing: not a chain
  ]
  if all(map(_state.is_state, leaves)):
    out.append(None)  # a wrapped EMA state (`masked(ema)`): no element at all
  return out


def without_ema(opt_state: Any, prefix: str, suffix: str) -> list[dict[str, str]]:
  """Each way the checkpoint of a run without the EMA names the leaves of
  `opt_state` (template name -> saved name; both under `prefix`, `suffix`)."""
  names = jax.tree.unflatten(
      jax.tree.structure(opt_state),
      list(named_leaves(opt_state, prefix, suffix)),
  )  # the state's tree with each leaf replaced by its template name
  return [
      {tname: rel for rel, tname in named_leaves(c, prefix, suffix).items()}
      for c in _strip(names)
      if c is not None
  ]


@dataclasses.dataclass
class _Diff:
  missing: list[str]  # template names not in the checkpoint
  extra: list[str]  # checkpoint names the template does not read
  changed: list[tuple[str, str]]  # (template name, saved name) of another spec

  def __bool__(self) -> bool:
    return bool(self.missing or self.extra or self.changed)


def _diff(
    saved: Mapping[str, Any],
    template: Mapping[str, Any],
    source: Mapping[str, str],
    ignored: Iterable[str] = (),
) -> _Diff:
  ignored = set(ignored) | set(source.values())
  return _Diff(
      missing=[n for n, s in source.items() if s not in saved],
      extra=[s for s in saved if s not in ignored],
      changed=[
          (n, s)
          for n, s in source.items()
          if s in saved and not _same(saved[s], _spec(template[n]))
      ],
  )


def plan(
    saved: Mapping[str, Any],
    template: Mapping[str, Any],
    found: list[Average],
    alternatives: list[dict[str, str]],
    missing_ema: MissingEma,
    where: str,
) -> dict[str, str | None]:
  """Template name -> saved name it is read from (`None`: a fresh EMA leaf).

  `saved` maps names to (shape, dtype); raises ValueError naming every
  difference when the checkpoint does not fit.
  """
  if missing_ema not in ("error", "init"):
    raise ValueError(f'`missing_ema` must be "error" or "init", got {missing_ema!r}.')
  swapped = [
      a for a in found if any(a.raw_name(n) in saved for n in template)
  ]
  saved = {
      # A swapped state's count is saved with the swapped shape; it is read
      # into the unswapped count (`read` reshapes it).
      name: (() if _is_swapped_count(name, spec, swapped) else spec[0], spec[1])
      for name, spec in saved.items()
  }
  source: dict[str, str] = {}
  shown_ema = []  # a swapped checkpoint's params hold the EMA: read, not used
  for name in template:
    source[name] = name
    for a in swapped:
      raw = a.raw_name(name)
      if raw is not None and raw in saved:
        source[name] = raw
        shown_ema.append(name)
  internal = [s for a in swapped for s in saved if a.internal(s)]
  diff = _diff(saved, template, source, [*internal, *shown_ema])
  if not diff:
    return dict(source)

  # A checkpoint written before the EMA was added to the chain?
  for alternative in alternatives:
    rest = {n: s for n, s in source.items() if not any(a.owns(n) for a in found)}
    rest.update(alternative)
    if not _diff(saved, template, rest):
      if missing_ema == "error":
        raise ValueError(
            f"{where} has no EMA state: it was written by a run without the "
            "EMA in its optimizer chain. To enable the EMA from here, restore "
            'with `missing_ema="init"`: the params, the step and the other '
            "optimizer state come back exactly and the EMA starts as a copy of "
            "the restored params (count 0)."
        )
      return {n: rest.get(n) for n in template}
  raise ValueError(_message(diff, saved, template, found, where))


def _is_swapped_count(name: str, spec: Any, swapped: list[Average]) -> bool:
  return tuple(spec[0]) == _state.SWAPPED_COUNT_SHAPE and any(
      a.owns(name) and a.field(name) == "count" for a in swapped
  )


# EMA state fields that exist with a setting only: (setting, on, off).
_PRESENCE = {
    "debias_norm": ("debias", "True", "False"),
    "rounding_key": ("rounding", "'stochastic'", "'nearest'"),
}


def _averaged_param(a: Average, name: str) -> str:
  """The params leaf an EMA leaf `<prefix>.ema.<leaf>` averages."""
  return f"{a.root}.{name[len(f'{a.prefix}.ema.'):]}"


def _message(
    diff: _Diff,
    saved: Mapping[str, Any],
    template: Mapping[str, Any],
    found: list[Average],
    where: str,
) -> str:
  lines: list[str] = []

  def add(line: str) -> None:
    if line not in lines:
      lines.append(line)

  def owner(name: str) -> Average | None:
    return next((a for a in found if a.owns(name)), None)

  for name in diff.missing + diff.extra:
    in_template = name in diff.missing
    side = "the template but not the checkpoint" if in_template else (
        "the checkpoint but not the template")
    a = owner(name)
    field = None if a is None else a.field(name)
    if a is None:
      add(f"`{name}` is in {side}.")
    elif field in _PRESENCE:
      setting, on, off = _PRESENCE[field]
      saved_as, template_as = (off, on) if in_template else (on, off)
      add(f"EMA at `{a.prefix}`: the checkpoint was written with "
          f"{setting}={saved_as}, the template has {setting}={template_as}; "
          f"build the template's EMA with {setting}={saved_as}.")
    elif not any(s.startswith(a.prefix + ".") for s in saved):
      add(f"EMA at `{a.prefix}`: the checkpoint has no EMA state there; it was "
          "written with another optimizer chain. Build the template with the "
          "chain the checkpoint was written with.")
    elif field == "ema" and _averaged_param(a, name) in saved.keys() & template:
      leaf = name[len(f"{a.prefix}.ema.") :]
      mine, other = ("template", "checkpoint") if in_template else ("checkpoint", "template")
      add(f"EMA at `{a.prefix}`: leaf `{leaf}` is averaged in the {mine} but "
          f"not in the {other}; build the template's EMA with the `mask` (or "
          "`optax.masked`) the checkpoint was written with.")
    else:
      add(f"`{name}` is in {side}.")
  for name, s in diff.changed:
    a = owner(name)
    (cs, cd), (ts, td) = saved[s], _spec(template[name])
    if a is not None and a.field(name) == "ema" and cs == ts:
      add(f"EMA at `{a.prefix}`: the checkpoint stores it in {cd}, the "
          f"template in {td}; build the template's EMA with "
          f"ema_dtype=jnp.{cd} (a restore never casts).")
    elif (a is not None and a.field(name) == "ema" and _state.is_multi(a.state)
          and cs[1:] == ts[1:] and cs and ts):
      add(f"EMA at `{a.prefix}`: the checkpoint holds {cs[0]} averages, the "
          f"template's `multi_ema` {ts[0]}; build it with the {cs[0]} decays "
          "the checkpoint was written with.")
    else:
      shown = name if s == name else f"{name}` (saved as `{s}"
      add(f"`{shown}`: {_show(saved[s])} in the checkpoint, "
          f"{_show((ts, td))} in the template.")
  more = len(lines) - _LIMIT
  listed = "\n".join(f"  - {line}" for line in lines[:_LIMIT])
  if more > 0:
    listed += f"\n  - ... and {more} more."
  return (
      f"{where} does not fit the template; nothing was restored:\n{listed}\n"
      "Restore into a template built with the model and optimizer settings "
      "the checkpoint was written with."
  )


def _layout(step_dir: Any) -> dict[str, str] | None:
  """Item name -> handler class name of a step, from Orbax's step record."""
  try:
    record = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    return {k: str(v).rsplit(".", 1)[-1] for k, v in record["item_handlers"].items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None  # older Orbax: no record, the item's own metadata decides


def saved_tree(manager: Any, step: int) -> Any:
  """The metadata tree (leaf shapes and dtypes) of a `save_checkpoint` item.

  Raises FileNotFoundError for a step that has no checkpoint, ValueError for
  a checkpoint of another layout than `save_checkpoint`'s.
  """
  import orbax.checkpoint as ocp

  steps = sorted(manager.all_steps())
  if step not in steps:
    raise FileNotFoundError(
        f"No checkpoint of step {step} in {manager.directory}; the steps "
        f"there are {steps}."
    )
  # A manager reads an item's metadata only once a save or restore has told it
  # the item's handler; `save_checkpoint`'s is known, so read it directly. The
  # manager alone knows where its step directories are (their name format).
  step_dir = manager._get_read_step_directory(step, manager.directory)
  items = _layout(step_dir)
  if items is None and not (step_dir / "default").exists():
    items = {p.name: "?" for p in step_dir.iterdir() if p.is_dir()}
  if items is not None and items != {"default": "StandardCheckpointHandler"}:
    found = ", ".join(f"`{k}` ({v})" for k, v in sorted(items.items())) or "no item"
    raise ValueError(
        f"The checkpoint at step {step} in {manager.directory} is not one "
        "`save_checkpoint` writes (a single item `default` saved with "
        f"`ocp.args.StandardSave`): it holds {found}. Restore it with Orbax "
        "and the args it was saved with, or write it with "
        "`ema_jax.flax.save_checkpoint`."
    )
  return ocp.StandardCheckpointHandler().metadata(step_dir / "default").tree


def saved_specs(metadata_tree: Any) -> dict[str, Any]:
  """Leaf name -> (shape, dtype) from Orbax's metadata tree."""
  import orbax.checkpoint as ocp

  # A Python scalar (a `TrainState.step`) is saved as one, int64 or float64
  # whatever it becomes in the template: its dtype is not checked.
  return {
      name: (tuple(m.shape), None if isinstance(m, ocp.metadata.ScalarMetadata)
             else _dtype(m.dtype))
      for name, m in named_leaves(metadata_tree).items()
  }


def _target_leaf(shape: tuple[int, ...], leaf: Any, meta: Any) -> Any:
  """Orbax's restore target for a template leaf, read as `meta` says it was saved.

  A target leaf without a sharding (an abstract template's) makes Orbax read
  the whole checkpoint's metadata again, to find the sharding it was saved
  with: seconds at 10,000 leaves. The metadata read for the checks has it; a
  leaf saved without one (a Python scalar, a NumPy array) Orbax restores as a
  NumPy array, which a NumPy target asks for directly (a view of one zero).
  A saved sharding that does not fit the devices is left to Orbax, which
  names the topology mismatch.
  """
  sharding = getattr(leaf, "sharding", None)
  saved = getattr(meta, "sharding", None)
  if sharding is None and saved is not None:
    try:
      sharding = saved.to_jax_sharding()
    except ValueError:
      pass
  elif sharding is None and isinstance(leaf.dtype, np.dtype):
    return np.broadcast_to(np.zeros((), leaf.dtype), shape)
  return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)


def read(
    manager: Any,
    step: int,
    metadata_tree: Any,
    template: Mapping[str, Any],
    source: Mapping[str, str | None],
) -> dict[str, Any]:
  """Restore the planned names: template name -> restored value."""
  import orbax.checkpoint as ocp

  wanted = {s: t for t, s in source.items() if s is not None}

  def like(name: str) -> str:
    # StandardRestore reads every saved leaf. The ones not used (a swapped
    # checkpoint's EMA in the params, its `index`) are read like the template
    # leaf of that name, or the `count` beside the index.
    if name in wanted:
      return wanted[name]
    return name if name in template else name.replace(".index", ".count")

  def target(path: Any, meta: Any) -> Any:
    leaf = template[like(".".join(map(key_name, path)))]
    if getattr(leaf, "dtype", None) is None:
      return leaf  # a Python scalar comes back as one
    # A swapped state's count (shape (1,)) is read as saved, reshaped below.
    shape = tuple(getattr(meta, "shape", leaf.shape))
    return _target_leaf(
        shape if shape == _state.SWAPPED_COUNT_SHAPE else leaf.shape, leaf, meta
    )

  item = jax.tree_util.tree_map_with_path(target, metadata_tree)
  restored = manager.restore(step, args=ocp.args.StandardRestore(item))
  return {
      wanted[n]: v.reshape(template[wanted[n]].shape) if hasattr(v, "reshape") else v
      for n, v in named_leaves(restored).items() if n in wanted
  }
