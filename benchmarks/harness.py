"""What every benchmark script shares: the machine, timing, summaries, JSON.

Timing is in interleaved rounds: each round runs every case of a group once,
in a new random order, each sample after one untimed call, and a case's
figure is the median over rounds (with quartiles). Scripts import this module
from beside them (`benchmarks/` is on `sys.path` when one runs).
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax

# --------------------------------------------------------------------------
# Machine and versions


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def _cpu_model() -> str:
  for line in _read("/proc/cpuinfo").splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def _meminfo_bytes(key: str) -> int | None:
  for line in _read("/proc/meminfo").splitlines():
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024
  return None


def _version(dist: str) -> str | None:
  # From the installed metadata, without importing: a package that is there
  # but does not import (timm beside a broken torchvision) still reports.
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine_info() -> dict[str, Any]:
  device = jax.devices()[0]
  info: dict[str, Any] = {
      "cpu_model": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "memory_total_bytes": _meminfo_bytes("MemTotal"),
      "memory_available_bytes": _meminfo_bytes("MemAvailable"),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax_backend": jax.default_backend(),
      "device": f"{device.platform}: {device.device_kind}",
      "device_count": jax.device_count(),
      "load_average_at_start": list(os.getloadavg()),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    info["device_memory_bytes"] = stats["bytes_limit"]
  return info


def versions() -> dict[str, str | None]:
  return {
      m: _version(m)
      for m in ("jax", "jaxlib", "optax", "flax", "keras", "torch", "timm", "numpy", "ema_jax")
  }


def _available_bytes() -> int:
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return _meminfo_bytes("MemAvailable") or 1 << 62


# --------------------------------------------------------------------------
# Timing


class Case:
  """One way to do the work: `make()` returns a zero-argument `run` that does
  one update (keeping its own state) and returns something to block on."""

  def __init__(
      self,
      name: str,
      make: Callable[[], Callable[[], Any]],
      nbytes: float,
      *,
      note: str = "",
      footprint: float = 0.0,
      sync: Callable[[Any], Any] = jax.block_until_ready,
      before: Callable[[], Any] | None = None,
      steps_per_call: int = 1,
  ):
    self.name, self.make, self.nbytes, self.note = name, make, nbytes, note
    self.footprint, self.sync, self.before = footprint, sync, before
    self.steps_per_call = steps_per_call  # times are reported per step
    self.samples: list[float] = []
    self.skipped: str | None = None
    self.run: Callable[[], Any] | None = None
    self.reps = 1


def _time_once(case: Case) -> float:
  assert case.run is not None
  if case.before is not None:
    case.before()
  # One untimed call first, so that a sample measures the steady state of
  # this case and not the caches, TLB or threads the previous case left.
  case.sync(case.run())
  t0 = time.perf_counter()
  out = None
  for _ in range(case.reps):
    out = case.run()
  case.sync(out)
  return (time.perf_counter() - t0) / (case.reps * case.steps_per_call)


def run_group(
    cases: list[Case],
    rounds: int,
    min_sample_s: float,
    after: Callable[[Case], None] | None = None,
) -> None:
  """Set up, warm up and calibrate every case, then time in interleaved rounds.

  `after(case)` runs for each live case once the rounds are done, before its
  state is freed (for a measurement of its own, e.g. the host dispatch)."""
  for case in cases:
    if case.skipped:
      continue
    if case.footprint > 0.6 * _available_bytes():
      case.skipped = (
          f"needs ~{case.footprint / 2**30:.1f} GiB, more than 60% of the "
          f"{_available_bytes() / 2**30:.1f} GiB available"
      )
      continue
    try:
      case.run = case.make()
      case.sync(case.run())  # compile
      case.sync(case.run())
      one = _time_once(case)
      case.reps = max(1, min(1000, int(min_sample_s / max(one, 1e-7))))
    except Exception as e:  # a comparator that fails is reported, not fatal
      case.skipped = f"failed: {type(e).__name__}: {str(e)[:200]}"
      case.run = None
  live = [c for c in cases if c.run is not None]
  # A new order every round: a fixed or merely rotated order would always put
  # the same case after the same (possibly memory-hungry) neighbour.
  rng = random.Random(0)
  for _ in range(rounds):
    for case in rng.sample(live, len(live)):
      case.samples.append(_time_once(case))
  if after is not None:
    for case in live:
      after(case)
  for case in cases:  # free the state before the next group
    case.run = None
  gc.collect()


def fresh_rounds(
    script: str,
    names: list[str],
    args: list[str],
    rounds: int,
    timeout: float = 1800,
) -> dict[str, list[dict[str, Any]]]:
  """Each case once per round, each sample in a new process, in a new random
  order every round: `python script NAME *args` prints its sample as a JSON
  object on its last line. Returns every case's samples, round by round.

  For what a process does once (tracing, compiling): in one process, every
  sample after the first would hit the caches the first one filled."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
  rng = random.Random(0)
  for _ in range(rounds):
    for name in rng.sample(names, len(names)):
      result = subprocess.run(
          [sys.executable, script, name, *args], env=env,
          capture_output=True, text=True, timeout=timeout,
      )
      if result.returncode != 0:
        raise RuntimeError(f"{script} {name} {' '.join(args)} failed:\n"
                           f"{result.stderr[-3000:]}")
      samples[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
  return samples


def quartiles(values: list[float]) -> dict[str, float]:
  """Median and quartiles ("inclusive": within the samples)."""
  q = (statistics.quantiles(values, n=4, method="inclusive")
       if len(values) > 1 else [values[0]] * 3)
  return {"median": statistics.median(values), "p25": q[0], "p75": q[2]}


def paired_ratios(cases: list[Case], base_name: str) -> dict[str, dict[str, float]]:
  """Each case's time over the baseline's in the same round: median, quartiles.

  Within a round the cases run back to back, so a ratio taken there cancels
  the load that drifts between rounds (a shared machine's other jobs)."""
  base = next(c for c in cases if c.name == base_name)
  out = {}
  for c in cases:
    if c.samples and len(c.samples) == len(base.samples):
      out[c.name] = quartiles([a / b for a, b in zip(c.samples, base.samples)])
  return out


def summary(case: Case) -> dict[str, Any]:
  out: dict[str, Any] = {"name": case.name, "note": case.note, "bytes": case.nbytes}
  if case.skipped or not case.samples:
    out["skipped"] = case.skipped or "no samples"
    return out
  med = statistics.median(case.samples)
  # "inclusive": quartiles within the samples (the default extrapolates).
  q = (statistics.quantiles(case.samples, n=4, method="inclusive")
       if len(case.samples) > 1 else [med] * 3)
  out.update(
      median_s=med,
      p25_s=q[0],
      p75_s=q[2],
      min_s=min(case.samples),
      max_s=max(case.samples),
      samples_s=case.samples,
      reps_per_sample=case.reps,
      gb_per_s=case.nbytes / med / 1e9,
  )
  return out



# --------------------------------------------------------------------------
# Output


def fmt_time(s: float) -> str:
  if s >= 1:
    return f"{s:.3g} s"
  if s >= 1e-3:
    return f"{s * 1e3:.3g} ms"
  return f"{s * 1e6:.3g} us"


def threaded(step: Callable[..., Any], state: Any, *args: Any) -> Callable[[], Any]:
  """A runner that feeds each call's result back in as the next call's state."""
  box = [state]

  def run() -> Any:
    box[0] = step(box[0], *args)
    return box[0]

  return run


def start(title: str, smoke: bool, settings: dict[str, Any], **sections: Any) -> dict[str, Any]:
  """A new report (time, mode, machine, versions, settings, then `sections`);
  prints its header."""
  report: dict[str, Any] = {
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "mode": "smoke" if smoke else "full",
      "machine": machine_info(),
      "versions": versions(),
      "settings": settings,
      **sections,
  }
  m = report["machine"]
  print(f"# {title} ({report['mode']})")
  print(f"machine: {m['cpu_model']}, {m['cpu_count']} cores, "
        f"{(m['memory_total_bytes'] or 0) / 2**30:.1f} GiB; device {m['device']}; "
        f"load average at start {m['load_average_at_start'][0]:.2f}")
  print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
  return report


def finish(report: dict[str, Any], started: float, out: str | None, name: str) -> int:
  """Record the load average and the time taken; write the JSON to `out`, or
  to benchmarks/results/<name>-<mode>-<time>.json. Returns the exit status."""
  report["machine"]["load_average_at_end"] = list(os.getloadavg())
  report["elapsed_s"] = time.time() - started
  out = out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      f"{name}-{report['mode']}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json",
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"\nload average at end {report['machine']['load_average_at_end'][0]:.2f}; "
        f"{report['elapsed_s']:.0f} s")
  print(f"JSON written to {out}")
  return 0
