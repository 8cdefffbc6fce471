"""Markdown tables from a benchmarks/run.py JSON file, for docs/benchmarks.md.

  python benchmarks/report.py benchmarks/results/bench-full-....json

Figures are rounded against ema_jax: its times up, its GB/s down, the
overheads of its train steps up; other libraries' figures to 3 digits.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

OURS = ("ema_jax", "ema() in the chain", "apply_updates_and_average")


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


def main() -> None:
  with open(sys.argv[1]) as f:
    report = json.load(f)
  m = report["machine"]
  print(f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, "
        f"{m['memory_total_bytes'] / 2**30:.1f} GiB; load average "
        f"{m['load_average_at_start'][0]:.1f} at start, "
        f"{m['load_average_at_end'][0]:.1f} at end.")
  print("Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
  print(ema_tables(report))
  print(step_table(report))


if __name__ == "__main__":
  main()
