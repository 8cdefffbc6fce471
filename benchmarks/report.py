"""Markdown tables from a benchmarks/run.py JSON file (for docs/benchmarks.md) or a
benchmarks/models.py one (for docs/benchmarks.md).

  python benchmarks/report.py benchmarks/results/bench-full-....json
  python benchmarks/report.py benchmarks/results/models-full-....json

Figures are rounded against ema_jax: its times up, its GB/s down, the
overheads of its train steps up; other libraries' figures to 3 digits.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

# ema_jax's own cases (run.py's and models.py's), rounded against it; the
# peers (`use_ema`, `ModelEmaV3`, `nnx.EMA`, ...) and baselines to the nearest.
OURS = ("ema_jax", "ema() in the chain", "apply_updates_and_average", "ema(",
        "average_stats", "hook", "context manager", "swap", "round trip")


def _sig(x: float, digits: int = 3, direction: str = "nearest") -> float:
  if x == 0 or not math.isfinite(x):
    return x
  scale = 10 ** (digits - 1 - math.floor(math.log10(abs(x))))
  f = {"up": math.ceil, "down": math.floor, "nearest": round}[direction]
  return f(x * scale) / scale


def _time(s: float, ours: bool) -> str:
  for unit, k in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
    if s >= k or unit == "us":
      v = _sig(s / k, direction="up" if ours else "nearest")
      return f"{v:g} {unit}".replace("us", "µs")
  raise AssertionError


def _size(n: int) -> str:
  e = round(math.log10(n))
  return f"1e{e}" if 10**e == n else str(n)


def ema_tables(report: dict[str, Any]) -> str:
  out = []
  groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
  for g in report["ema"]:
    groups.setdefault((g["dtype"], g["leaves"]), []).append(g)
  for (dtype, leaves), gs in groups.items():
    sizes = [g["n"] for g in gs]
    what = "float32 params" if dtype == "float32" else "bfloat16 params, float32 average"
    out.append(f"\n**EMA update, {what}, {leaves} {'leaves' if leaves > 1 else 'leaf'}**: "
               "median time per update (GB/s)\n")
    out.append("| | " + " | ".join(f"N={_size(n)}" for n in sizes) + " |")
    out.append("|---|" + "---:|" * len(sizes))
    names = list(dict.fromkeys(c["name"] for g in gs for c in g["cases"]))
    for name in names:
      ours = name.startswith(OURS)
      cells = []
      for g in gs:
        c = next((c for c in g["cases"] if c["name"] == name), None)
        if c is None or "median_s" not in c:
          cells.append("—")
          continue
        gbs = _sig(c["gb_per_s"], direction="down" if ours else "nearest")
        cells.append(f"{_time(c['median_s'], ours)} ({gbs:g})")
      label = f"**{name}**" if ours else name
      out.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def step_table(report: dict[str, Any]) -> str:
  out = [
      "\n| step | params | leaves | N | without EMA | `ema()` in the chain | "
      "`apply_updates_and_average` | byte floor | XLA's bytes | CPU barrier off | "
      "`update_every=4` (per step) | its floor |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in report["step"]:
    cases = {c["name"]: c for c in r["cases"]}
    base = cases.get("without EMA", {})
    if "median_s" not in base:
      continue

    def ratio(name: str, ours: bool = True) -> str:
      c = cases.get(name, {})
      if "median_s" not in c:
        return "—"
      x = c["median_s"] / base["median_s"]
      return f"{_sig(x, 3, 'up' if ours else 'nearest'):.2f}x"

    xla = r["xla"]["ema() in the chain"]["bytes_accessed"] / r["xla"]["without EMA"]["bytes_accessed"]
    ablation = "ema() in the chain, CPU barrier off (ablation)"
    out.append(
        f"| {r['optimizer']} | {r['dtype']} | {r['leaves']} | {_size(r['n'])} | "
        f"{_time(base['median_s'], False)} | {ratio('ema() in the chain')} | "
        f"{ratio('apply_updates_and_average')} | {r['floor_ratio']:.2f}x | {xla:.2f}x | "
        f"{ratio(ablation, False) if ablation in cases else ''} | "
        f"{ratio('ema(update_every=4) in the chain')} | "
        f"{r.get('floor_ratio_update_every', float('nan')):.2f}x |"
    )
  return "\n".join(out)


def tree_table(report: dict[str, Any]) -> str:
  """run.py's `tree` section: median (quartiles), ratio of medians, paired ratio."""
  out = []
  for res in report.get("tree", []):
    out.append(f"\n**The standalone update on a real tree** ({res['leaves']} leaves, "
               f"{res['n']:,} elements, median leaf {res['median_leaf']}): ratios to "
               f"`optax.incremental_update` (jit, donated)\n")
    out.append("| case | median | p25-p75 | ratio of medians | paired ratio (p25-p75) |")
    out.append("|---|---:|---:|---:|---:|")
    for c in res["cases"]:
      ours = c["name"].startswith(OURS)
      name = f"**{c['name']}**" if ours else c["name"]
      if "median_s" not in c:
        out.append(f"| {name} | skipped: {c['skipped']} | | | |")
        continue
      p = res["paired"][c["name"]]
      way = "up" if ours else "nearest"
      out.append(
          f"| {name} | {_time(c['median_s'], ours)} | {_time(c['p25_s'], False)}-"
          f"{_time(c['p75_s'], False)} | "
          f"{_sig(c['median_s'] / res['base_median_s'], 3, way):.3g}x | "
          f"{_sig(p['median'], 3, way):.3g}x ({p['p25']:.2f}-{p['p75']:.2f}) |")
  return "\n".join(out)


def models_tables(report: dict[str, Any]) -> str:
  """One table per (model, framework): median (quartiles), ratio, dispatch."""
  out = []
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in report["records"]:
    groups.setdefault((r["model"], r["framework"]), []).append(r)
  for (model, framework), recs in groups.items():
    info = report["models"][model]
    base = next((r.get("baseline") for r in recs if r.get("baseline")), None)
    out.append(f"\n**{model}, {framework}** ({info['params']:,} params in "
               f"{info['param_leaves']} leaves){f': ratio to {base}' if base else ''}\n")
    out.append("```text")
    w = max(len(r["case"]) for r in recs) + 2
    out.append(f"{'case'.ljust(w)}{'median':>10}{'p25-p75':>20}{'ratio':>8}{'dispatch':>10}")
    for r in recs:
      if "median_s" not in r:
        out.append(f"{r['case'].ljust(w)}skipped: {r['skipped']}")
        continue
      ours = r["case"].startswith(OURS)
      ratio = f"{_sig(r['ratio'], 3, 'up' if ours else 'nearest'):.2f}x" if "ratio" in r else ""
      quart = f"{_time(r['p25_s'], False)}-{_time(r['p75_s'], False)}"
      disp = _time(r["dispatch_s"], ours) if "dispatch_s" in r else ""
      out.append(f"{r['case'].ljust(w)}{_time(r['median_s'], ours):>10}{quart:>20}"
                 f"{ratio:>8}{disp:>10}")
    out.append("```")
  return "\n".join(out)


def main() -> None:
  with open(sys.argv[1]) as f:
    report = json.load(f)
  m = report["machine"]
  print(f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, "
        f"{m['memory_total_bytes'] / 2**30:.1f} GiB; load average "
        f"{m['load_average_at_start'][0]:.1f} at start, "
        f"{m['load_average_at_end'][0]:.1f} at end.")
  print("Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
  if "records" in report:
    print(models_tables(report))
    return
  if report.get("ema"):
    print(ema_tables(report))
  if report.get("step"):
    print(step_table(report))
  print(tree_table(report))


if __name__ == "__main__":
  main()
