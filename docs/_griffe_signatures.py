"""A griffe extension (mkdocs.yml, `extensions:`): signatures made at run time.

Griffe reads the source, where a `NamedTuple` (`EmaState`, `SweepResult`) or a
Flax struct dataclass (`ema_jax.flax.TrainState`) has no `__init__`: Python
makes it when the class is created. For such a class this extension asks the
class itself (`inspect.signature`) and gives griffe that `__init__`, keeping
griffe's own annotations where the class declares the field, so the API
reference shows `EmaState(count, ema, debias_norm=None, rounding_key=None)`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from typing import Any

import griffe


def _runtime(cls: griffe.Class) -> Any:
  obj: Any = importlib.import_module(cls.module.path)
  for part in cls.path.removeprefix(cls.module.path + ".").split("."):
    obj = getattr(obj, part)
  return obj


def _source_annotations(runtime: type) -> dict[str, str]:
  """Each field's annotation as its class's source writes it (`int | jax.Array`)."""
  written: dict[str, str] = {}
  for base in reversed(runtime.__mro__[:-1]):
    try:
      tree = ast.parse(textwrap.dedent(inspect.getsource(base)))
    except (OSError, TypeError, SyntaxError):
      continue
    for node in tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else ():
      if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        written[node.target.id] = ast.unparse(node.annotation)
  return written


def _annotation(cls: griffe.Class, name: str, written: dict[str, str]) -> Any:
  member = cls.all_members.get(name)
  if member is not None and not member.is_alias and member.is_attribute and member.annotation is not None:
    return member.annotation  # griffe's, which links to the API's entries
  return written.get(name)


def _set_init(cls: griffe.Class) -> None:
  try:
    runtime = _runtime(cls)
    signature = inspect.signature(runtime)
  except (ImportError, AttributeError, TypeError, ValueError):
    return
  written = _source_annotations(runtime)
  parameters = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
  for p in signature.parameters.values():
    parameters.append(griffe.Parameter(
        p.name,
        annotation=_annotation(cls, p.name, written),
        kind=griffe.ParameterKind(p.kind.description),
        default=None if p.default is inspect.Parameter.empty else repr(p.default),
    ))
  cls.set_member("__init__", griffe.Function(
      "__init__", lineno=0, endlineno=0, parent=cls,
      parameters=griffe.Parameters(*parameters), returns="None",
  ))


def _walk(obj: griffe.Module | griffe.Class, seen: set[str]) -> None:
  if obj.path in seen:
    return
  seen.add(obj.path)
  if isinstance(obj, griffe.Class) and "__init__" not in obj.all_members:
    _set_init(obj)
  for member in list(obj.members.values()):
    if not member.is_alias and (member.is_module or member.is_class):
      _walk(member, seen)  # type: ignore[arg-type]


class RuntimeSignatures(griffe.Extension):
  """Gives a class without `__init__` in its source the signature Python reports."""

  def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
    del kwargs
    _walk(pkg, set())
