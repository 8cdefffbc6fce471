"""Every public name carries a docstring with an example that the doctests run."""

from __future__ import annotations

import inspect

import pytest

import ema_jax
import ema_jax.flax
import ema_jax.posthoc
import ema_jax.presets

MODULES = [ema_jax, ema_jax.flax, ema_jax.posthoc, ema_jax.presets]


def public_names():
  for module in MODULES:
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.ismodule(obj):
        continue
      if not (inspect.isclass(obj) or inspect.isroutine(obj)):  # a type alias: the package docstring says what it is
        assert name in (module.__doc__ or ""), f"{module.__name__}.{name}"
        continue
      yield f"{module.__name__}.{name}", obj
      if inspect.isclass(obj):
        for attr, member in vars(obj).items():
          # `replace` comes from flax.struct's dataclass machinery.
          if attr.startswith("_") or attr == "replace" or not callable(member):
            continue
          if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
          yield f"{module.__name__}.{name}.{attr}", member


@pytest.mark.parametrize("qualname, obj", list(public_names()), ids=lambda x: x if isinstance(x, str) else "")
def test_public_name_has_doctested_example(qualname, obj):
  doc = inspect.getdoc(obj) or ""
  assert doc, f"{qualname} has no docstring"
  assert ">>>" in doc, f"{qualname}'s docstring has no doctest example"


def test_every_public_name_has_an_api_page_entry():
  """docs/api.md documents each public name, itself or through its module."""
  import pathlib

  api = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api.md"
  entries = {
      line.removeprefix(":::").strip()
      for line in api.read_text().splitlines() if line.startswith(":::")
  }
  missing = [
      f"{module.__name__}.{name}"
      for module in MODULES
      for name in module.__all__
      if not inspect.ismodule(getattr(module, name))
      and f"{module.__name__}.{name}" not in entries
      and module.__name__ not in entries  # a module entry renders its members
  ]
  assert not missing, f"not in docs/api.md: {missing}"
