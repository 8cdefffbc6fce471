"""The built documentation site, opened as a reader sees it.

Builds the site once (`mkdocs build --strict`, figures included) and reads its
HTML: every public name of the packages' `__all__` has a heading with its
signature in the API reference, every figure is there and small, every code
block is highlighted, and a doctest block's copy button gives a script.
"""

from __future__ import annotations

import ast
import contextlib
import html
import importlib.util
import inspect
import io
import json
import pathlib
import re
import subprocess
import sys

import pytest

import ema_jax
import ema_jax.flax
import ema_jax.posthoc
import ema_jax.presets

pytest.importorskip("mkdocs")

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = [ema_jax, ema_jax.presets, ema_jax.posthoc, ema_jax.flax]
FIGURES = {  # figure: the page it must appear on
    "demo-accuracy.svg": "index.html",
    "decay-schedules.svg": "optax/index.html",
    "posthoc-profiles.svg": "posthoc/index.html",
    "benchmark-ratios.svg": "benchmarks/index.html",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("site")
  build = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
      cwd=ROOT, capture_output=True, text=True, env={**_env(), "NO_MKDOCS_2_WARNING": "1"},
  )
  log = build.stdout + build.stderr
  assert build.returncode == 0, log
  assert "WARNING" not in log, log
  # mkdocstrings prints this (as INFO) and leaves the signatures unformatted.
  assert "requires either Black or Ruff" not in log, f"install the docs extra: {log}"
  return out


def _env() -> dict[str, str]:
  import os

  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  return env


def _pages(site: pathlib.Path) -> dict[str, str]:
  return {
      str(p.relative_to(site)): p.read_text()
      for p in site.rglob("index.html")
      if p.parent.name != "404"
  }


def _public_names():
  for module in MODULES:
    for name in module.__all__:
      obj = getattr(module, name)
      if not inspect.ismodule(obj):
        yield f"{module.__name__}.{name}", obj


def _hooks():
  spec = importlib.util.spec_from_file_location("_docs_hooks", ROOT / "docs" / "_hooks.py")
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_public_name_has_a_heading_with_its_signature(site):
  api = (site / "api" / "index.html").read_text()
  # Each object's section: from its heading to the next heading of the API.
  heading = re.compile(r'<h([2-6]) id="([\w.]+)" class="doc doc-heading">(.*?)</h\1>', re.S)
  sections = {}
  matches = list(heading.finditer(api))
  for match, following in zip(matches, matches[1:] + [None]):
    end = following.start() if following else len(api)
    sections[match.group(2)] = (match.group(3), api[match.end() : end])
  problems = []
  for qualname, obj in _public_names():
    if qualname not in sections:
      problems.append(f"{qualname}: no heading")
      continue
    title, body = sections[qualname]
    kind = "class" if inspect.isclass(obj) else "function" if inspect.isroutine(obj) else "attribute"
    if f"doc-symbol-{kind}" not in title:
      problems.append(f"{qualname}: its heading does not say it is a {kind}")
    signature = re.search(r'<div class="language-python doc-signature highlight"><pre>(.*?)</pre>', body, re.S)
    if signature is None:
      problems.append(f"{qualname}: no signature under its heading")
      continue
    text = html.unescape(re.sub(r"<[^>]+>", "", signature.group(1)))
    if kind != "attribute" and not text.lstrip().startswith(qualname.rsplit(".", 1)[1] + "("):
      problems.append(f"{qualname}: its signature reads {text[:60]!r}")
  assert not problems, "\n".join(problems)


def test_docstrings_render_as_markdown(site):
  api = (site / "api" / "index.html").read_text()
  text = html.unescape(re.sub(r"<[^>]+>", "", api))
  assert not re.search(r"\w::\s*$", text, re.M), "a reST `::` block rendered as text"
  # A qualified name in a docstring links to its entry.
  assert re.search(r'<a class="autorefs autorefs-internal"[^>]* href="#ema_jax\.swap"><code>ema_jax\.swap', api)


def test_figures_are_there_small_and_captioned(site):
  pages = _pages(site)
  for name, page in FIGURES.items():
    figure = site / "figures" / name
    assert figure.is_file(), name
    assert figure.stat().st_size < 200_000, f"{name}: {figure.stat().st_size} bytes"
    assert f'src="{"../" * page.count("/")}figures/{name}"' in pages[page], f"{name} not on {page}"
  for page, text in pages.items():
    for figure in re.findall(r"<figure.*?</figure>", text, re.S):
      caption = re.search(r"<figcaption>(.*?)</figcaption>", figure, re.S)
      assert caption, f"{page}: a figure without a caption"
      words = caption.group(1)
      assert "docs/_figures.py" in words, f"{page}: the caption does not say what drew it"
      assert "machine" in words or "VM" in words, f"{page}: the caption names no machine"
  # The home page's caption describes the run the figure plots.
  demo = json.loads((ROOT / "docs" / "figures" / "demo_accuracy.json").read_text())
  caption = re.search(r"<figcaption>(.*?)</figcaption>", pages["index.html"], re.S).group(1)
  caption = " ".join(caption.split())
  for fact in (f"{demo['epochs']} epochs in {demo['seconds']:.0f} s",
               f"{demo['machine']['cpus']}-core", demo["machine"]["processor"].replace("(R)", "")[:11]):
    assert fact in caption, (fact, caption)


def test_every_code_block_is_highlighted(site):
  problems = []
  for page, text in _pages(site).items():
    assert '"content.code.copy"' in text, f"{page}: no copy buttons"
    for pre in re.findall(r"(<div[^>]*>)?<pre[^>]*>(.*?)</pre>", text, re.S):
      div, code = pre
      language = re.search(r'class="language-(\w+)', div or "")
      if language is None:
        problems.append(f"{page}: a code block without a language: {code[:80]!r}")
      elif language.group(1) != "text" and '<span class="' not in code:
        problems.append(f"{page}: a {language.group(1)} block without highlighting")
      elif language.group(1) != "pycon" and re.search(r"^(<[^>]*>)*&gt;&gt;&gt; ", code, re.M):
        problems.append(f"{page}: a doctest in a {language.group(1)} block, not pycon")
  assert not problems, "\n".join(problems)


def test_doctest_blocks_copy_a_script(site):
  blocks = 0
  for page, text in _pages(site).items():
    for div in re.findall(r'<div class="language-pycon[^"]*"[^>]*>', text):
      copy = re.search(r'data-copy="([^"]*)"', div)
      assert copy, f"{page}: a doctest block whose copy button copies its prompts"
      script = html.unescape(copy.group(1))
      assert ">>>" not in script, (page, script)
      compile(script, page, "exec")
      blocks += 1
  assert blocks > 50
  # The home page's quick start, copied, runs and prints what the page shows.
  home = _pages(site)["index.html"]
  script = html.unescape(re.search(r'data-copy="([^"]*)"', home).group(1))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(script, "index.md", "exec"), {})
  assert "[0.1 0.1]" in printed.getvalue()


def test_doctest_script():
  source = """\
>>> x = 1  # set
>>> x + 1  # shown
2
>>> def f():
...   return x
>>> f()
1
>>> int("a")
Traceback (most recent call last):
...
ValueError: invalid literal
>>> print(x)
1
>>> x, x
(1, 1)
"""
  script = _hooks().doctest_script(source)
  assert script == (
      "x = 1  # set\n"
      "print(x + 1)  # shown\n"
      "def f():\n"
      "  return x\n"
      "print(f())\n"
      "# raises ValueError:\n"
      '# int("a")\n'
      "print(x)\n"
      "print((x, x))\n"
  )
  ast.parse(script)


def test_a_block_says_what_it_uses_from_the_blocks_above():
  block = '<div class="language-pycon highlight"><pre><span></span><code>{}</code></pre></div>'
  page = block.format("&gt;&gt;&gt; import math\n&gt;&gt;&gt; y = 2\n") + block.format(
      "&gt;&gt;&gt; def f(z):\n...   return z\n&gt;&gt;&gt; math.sqrt(f(y))\n1.41...\n")
  first, second = (html.unescape(c) for c in re.findall(r'data-copy="([^"]*)"', _hooks()._copy_scripts(page)))
  assert first == "import math\ny = 2\n"
  assert second.splitlines()[0] == "# Run the examples above on this page first: this uses math, y."


def test_benchmarks_page_is_short():
  size = len((ROOT / "docs" / "benchmarks.md").read_bytes())
  assert size <= 12 * 1024, f"docs/benchmarks.md is {size} bytes; move detail to the scripts"
