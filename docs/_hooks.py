"""MkDocs hooks (`hooks:` in mkdocs.yml): the figures, and links for API names.

- The figures are drawn at build time by `docs/_figures.py` from the repo's
  code and committed run data, so a built site never shows a stale figure.
- A doctest block (```` ```pycon ````, and the examples of docstrings) keeps its
  prompts and outputs on the page, as the doctests run it; its copy button
  copies the script instead: the statements without prompts or outputs, a
  value the REPL shows printed, a statement shown raising commented out, and a
  first line naming what it uses from the page's earlier examples
  (mkdocs-material copies a code block's `data-copy` attribute when it has
  one).
- `<code>ema_jax.swap</code>` anywhere on a page (guides and docstrings alike)
  becomes a link to that name's entry in the API reference, resolved by
  mkdocs-autorefs like mkdocstrings' own cross-references; so does a bare
  `<code>swap</code>` whose name one module alone exports.
"""

from __future__ import annotations

import ast
import doctest
import functools
import html as html_lib
import importlib.util
import pathlib
import re

_DOCS = pathlib.Path(__file__).resolve().parent


def _figures_module():
  spec = importlib.util.spec_from_file_location("_ema_jax_figures", _DOCS / "_figures.py")
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def on_files(files, config):
  from mkdocs.structure.files import File

  for name, content in _figures_module().render_all().items():
    files.append(File.generated(config, f"figures/{name}", content=content))
  return files


# `<code>ema_jax.name</code>` or `<code>name</code>`, optionally a call
# (`ema_jax.ema(0.9)`), outside links, headings and code blocks.
_SKIP = re.compile(r"<(/?)(a|pre|h[1-6]|autoref)\b[^>]*>")
_NAME = re.compile(r"<code>(ema_jax(?:\.[A-Za-z_]\w*)+|[A-Za-z_]\w*)(\([^<]*\))?</code>")
# Bare names that mostly mean something else on these pages: Flax's own classes, a
# state's `ema` field, the libraries the presets are named after, a variable.
_NOT_BARE = {"TrainState", "Optimizer", "ema", "reset", "keras", "tfa", "timm", "diffusers",
             "ema_pytorch", "ema_weights", "is_swapped"}


@functools.cache
def _bare_names() -> dict[str, str]:
  """`name: module.name` for the public names that one module alone exports."""
  import importlib

  owners: dict[str, list[str]] = {}
  for module_name in ("ema_jax", "ema_jax.presets", "ema_jax.posthoc", "ema_jax.flax"):
    try:
      module = importlib.import_module(module_name)
    except ImportError:  # ema_jax.flax without Flax: its names stay unlinked
      continue
    for name in module.__all__:
      owners.setdefault(name, []).append(f"{module_name}.{name}")
  return {name: paths[0] for name, paths in owners.items() if len(paths) == 1 and name not in _NOT_BARE}


def _link_names(text: str) -> str:
  def link(match: re.Match) -> str:
    name = match.group(1)
    if not name.startswith("ema_jax."):
      name = _bare_names().get(name, "")
      if not name:
        return match.group(0)
    return f'<autoref identifier="{name}" optional>{match.group(0)}</autoref>'

  return _NAME.sub(link, text)


def _printed(code: str) -> str:
  """`code` printing its value, when it is one expression (the REPL shows it; a script would not)."""
  body = ast.parse(code).body
  if len(body) != 1 or not isinstance(body[0], ast.Expr):
    return code
  node = body[0].value
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
    return code
  lines = code.splitlines()
  assert node.end_lineno is not None and node.end_col_offset is not None
  comment = lines[node.end_lineno - 1][node.end_col_offset :]  # a trailing `# ...`, if any
  value = ast.get_source_segment(code, node)
  if isinstance(node, ast.Tuple) and not value.startswith("("):
    value = f"({value})"  # print the tuple the REPL shows, not its items
  return f"print({value}){comment}"


def doctest_script(source: str) -> str:
  """The doctest `source` as a script: no prompts, no outputs, raising lines commented out."""
  lines = []
  for example in doctest.DocTestParser().get_examples(source):
    code = example.source.rstrip("\n")
    if example.exc_msg is not None:
      lines.append(f"# raises {example.exc_msg.split(':', 1)[0].strip()}:")
      code = "\n".join(f"# {line}" for line in code.splitlines())
    elif example.want:
      code = _printed(code)
    lines.append(code)
  return "\n".join(lines) + "\n"


_PYCON = re.compile(r'<div class="language-pycon highlight">(<pre><span></span><code>(.*?)</code></pre>)', re.S)
_TAG = re.compile(r"<[^>]+>")


def _names(script: str) -> tuple[set[str], set[str]]:
  """The names `script` binds, and the names it reads without binding them."""
  bound, read = set(), set()
  for node in ast.walk(ast.parse(script)):
    if isinstance(node, ast.Name):
      (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, ast.alias):
      bound.add((node.asname or node.name).split(".")[0])
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
  return bound, read - bound


def _copy_scripts(html: str) -> str:
  """Gives each doctest block its script; a block that uses an earlier block's names says so."""
  earlier: set[str] = set()

  def add(match: re.Match) -> str:
    source = html_lib.unescape(_TAG.sub("", match.group(2)))
    script = doctest_script(source)
    bound, read = _names(script)
    if needs := sorted(read & earlier):
      script = f"# Run the examples above on this page first: this uses {', '.join(needs)}.\n" + script
    earlier.update(bound)
    copy = html_lib.escape(script, quote=True)
    return f'<div class="language-pycon highlight" data-copy="{copy}">{match.group(1)}'

  return _PYCON.sub(add, html)


def on_page_content(html, page, config, files):
  html = _copy_scripts(html)
  out, depth, pos = [], 0, 0
  for tag in _SKIP.finditer(html):
    chunk = html[pos : tag.start()]
    out.append(chunk if depth else _link_names(chunk))
    out.append(tag.group(0))
    depth = max(0, depth + (-1 if tag.group(1) else 1))
    pos = tag.end()
  tail = html[pos:]
  out.append(tail if depth else _link_names(tail))
  return "".join(out)
