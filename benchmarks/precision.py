"""Where a float32 moving average stops moving, and what the remedies give.

The EMA update is `e <- e + w * (p - e)` with `w = 1 - decay` (computed in
float64, then cast to the average's dtype). In float32, round-to-nearest drops
an increment `w * (p - e)` smaller than half an ulp of `e`: the average stalls
when the relative gap `|p - e| / |e|` falls below about `2**-24 / w`
(between `2**-25 / w` and `2**-24 / w` for `|e|` in [1, 2): only the ratio
matters, the ulp of `e` scales with `|e|`).

For each `w` and relative gap, many independent elements (`e0` uniform in
[1, 2), `p = e0 * (1 +- gap)`, both float32) are averaged for
`min(5 / w, 1e6)` steps towards

  fixed   the target `p` at every step;
  noisy   `p_t = p + noise * gap * e0 * u_t`, `u_t` uniform with unit variance
          (a cheap xorshift generator; the same sequence for every storage),

in these storages:

  float32               the engine's update `e + float32(w) * (p_t - e)`.
  float64               the same in float64 (x64 on: the first remedy).
  float32 every k       `update_every=k`: averaged on every k-th step only,
                        with `w_k = 1 - decay**k` (the second remedy), for
                        k in 10, 100, ... with `k w <= 0.1` and `k <= N / 10`.

Each is compared with a compensated float64 (double-double) average of the
same sequence (for `update_every=k`, of the same k-th-step sequence, so only
rounding is measured, not the sampling). The figure is the progress ratio
`(e_N - e0) / (exact_N - e0)` per element: its worst error `|ratio - 1|` over
the elements, and the share of elements that never moved (stalled). For the
fixed target the half-ulp rule's prediction of a stall at the first step is
checked against the measurement, and the compensated reference against the
closed form `(p - e0) * (1 - (1 - w)**N)`. A threshold scan takes one float32
step at gaps across the band `[2**-25, 2**-24] / w`. Last, `ema_jax.ema` as
installed is compared bit for bit with the float32 update (fixed target).
Whether XLA fuses the float32 update into one fused multiply-add (one rounding)
is detected and reported; the half-ulp rule is the same either way, up to the
product's own rounding.

Prints a markdown report; writes the JSON (one record per w, gap, target and
storage, plus the machine) to `--out` (default
benchmarks/results/precision.json). `--smoke` runs a tiny grid in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64 for the references and the remedy

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

FULL = dict(
    weights=(1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7),
    gaps=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
    elements=256,
    max_steps=10**6,
    every=(10, 100, 1000, 10**4, 10**5),
    scan_elements=4096,
)
SMOKE = dict(
    weights=(1e-2, 1e-4),
    gaps=(1e-2, 1e-5, 1e-6),
    elements=16,
    max_steps=2000,
    every=(10, 100),
    scan_elements=256,
)
HORIZONS = 5  # steps = min(HORIZONS / w, max_steps)
TARGETS = ("fixed", "noisy")
# Threshold scan: relative gaps at x * 2**-24 / w, around the band [0.5, 1].
SCAN = (0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
HALF_ULP = 2.0**-24  # half an ulp of 1 in float32: ulp(e) / 2 = 2**-24 * 2**floor(log2 e)


# --------------------------------------------------------------------------
# Machine


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.machine()


def machine_info() -> dict[str, Any]:
  return {
      "processor": platform.processor(),
      "cpu_model": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "numpy": np.__version__,
      "jax_backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "update_rounding": update_rounding(),
  }


def update_rounding() -> str:
  """Whether XLA computes `e + w * (p - e)` in float32 with one rounding (a
  fused multiply-add) or two, judged on random data against both."""
  rng = np.random.default_rng(2)
  e = rng.uniform(1, 2, 10**5).astype(np.float32)
  p = (e * (1 + rng.uniform(-1e-3, 1e-3, e.size))).astype(np.float32)
  w = np.float32(1e-3)
  got = np.asarray(jax.jit(lambda e, p: e + w * (p - e))(e, p))
  two = e + (w * (p - e)).astype(np.float32)
  one = (e.astype(np.float64) + np.float64(w) * (p.astype(np.float64) - e)).astype(np.float32)
  if np.array_equal(got, one) and not np.array_equal(got, two):
    return "fma"
  if np.array_equal(got, two) and not np.array_equal(got, one):
    return "two roundings"
  return "undetermined"


# --------------------------------------------------------------------------
# Theory


def weight_every(w: float, k: int) -> float:
  """`1 - (1 - w)**k` in float64, without cancellation."""
  return -math.expm1(k * math.log1p(-w))


def threshold_band(w: float) -> tuple[float, float]:
  """Relative gaps below the first lose every increment for |e| in [1, 2);
  at or above the second none is lost (the ulp is 2**-23 in [1, 2))."""
  return HALF_ULP / 2 / w, HALF_ULP / w


def k_for_half_ulp(w: float, gap: float) -> int | None:
  """Smallest `update_every` whose first increment is at least half an ulp
  for every |e| in [1, 2): `1 - (1 - w)**k >= 2**-24 / gap`."""
  need = HALF_ULP / gap
  if need >= 1:
    return None
  k = max(1, math.ceil(math.log1p(-need) / math.log1p(-w)))
  while weight_every(w, k) < need:  # guard the log's last bit
    k += 1
  return k


def predicted_first_step_lost(e0: np.ndarray, p: np.ndarray, w32: np.float32) -> np.ndarray:
  """The half-ulp rule: `w * |p - e| < ulp(e) / 2`, with the ulp on p's side."""
  toward = np.abs(np.nextafter(e0, p).astype(np.float64) - e0.astype(np.float64))
  step = float(w32) * np.abs(p.astype(np.float64) - e0.astype(np.float64))
  return step < toward / 2


# --------------------------------------------------------------------------
# The measurement


def _two_sum_step(hi, lo, p, w):
  """One compensated float64 EMA step: (hi + lo) += w * (p - (hi + lo))."""
  inc = w * ((p - hi) - lo)
  s = hi + inc
  bb = s - hi
  err = (hi - (s - bb)) + (inc - bb)
  lo = lo + err
  hi2 = s + lo
  return hi2, lo - (hi2 - s)


def _xorshift(s):
  s = s ^ (s << 13)
  s = s ^ (s >> 17)
  return s ^ (s << 5)


def _uniform_unit_variance(s):
  u = (s >> 8).astype(jnp.float32) * jnp.float32(2.0**-24) + jnp.float32(2.0**-25)
  return (u - jnp.float32(0.5)) * jnp.float32(math.sqrt(12.0))


def run_one_weight(w: float, steps: int, every: tuple[int, ...], e0: np.ndarray,
                   p: np.ndarray, sigma: np.ndarray, seed: np.ndarray) -> dict[str, np.ndarray]:
  """All storages for one `w`, in one loop over `steps` steps.

  `e0`, `p`, `sigma`: float32 arrays of shape (gaps, elements). Returns final
  values of shape (targets, gaps, elements)."""
  w64 = 1.0 - (1.0 - w)  # what the engine carries for decay = 1 - w: exact
  w32 = jnp.float32(w64)
  wk = {k: weight_every(w64, k) for k in every}

  def targets(s):
    z = _uniform_unit_variance(s)
    pf = jnp.asarray(p)
    return jnp.stack([pf, pf + jnp.asarray(sigma) * z])  # float32

  def body(t, c):
    s = _xorshift(c["s"])
    pt = targets(s)
    pt64 = pt.astype(jnp.float64)
    new = dict(c, s=s)
    e = c["f32"]
    e_new = e + w32 * (pt - e)
    new["f32"], new["moved_f32"] = e_new, c["moved_f32"] | (e_new != e)
    e64 = c["f64"] + w64 * (pt64 - c["f64"])
    new["f64"], new["moved_f64"] = e64, c["moved_f64"] | (e64 != c["f64"])
    new["ref_hi"], new["ref_lo"] = _two_sum_step(c["ref_hi"], c["ref_lo"], pt64, w64)
    for k in every:
      names = (f"f32_{k}", f"moved_{k}", f"ref_hi_{k}", f"ref_lo_{k}")

      def update(v, k=k):
        e, moved, hi, lo = v
        e_new = e + jnp.float32(wk[k]) * (pt - e)
        return (e_new, moved | (e_new != e)) + _two_sum_step(hi, lo, pt64, wk[k])

      # A cond, not a select: the k-th-step average costs nothing in between.
      got = jax.lax.cond((t + 1) % k == 0, update, lambda v: v, tuple(c[n] for n in names))
      new |= dict(zip(names, got))
    return new

  shape = (len(TARGETS),) + e0.shape
  f32 = jnp.broadcast_to(jnp.asarray(e0), shape)
  f64 = f32.astype(jnp.float64)
  zero64 = jnp.zeros(shape, jnp.float64)
  no = jnp.zeros(shape, bool)
  init = {"s": jnp.asarray(seed), "f32": f32, "moved_f32": no, "f64": f64, "moved_f64": no,
          "ref_hi": f64, "ref_lo": zero64}
  for k in every:
    init |= {f"f32_{k}": f32, f"moved_{k}": no, f"ref_hi_{k}": f64, f"ref_lo_{k}": zero64}
  out = jax.jit(lambda c: jax.lax.fori_loop(0, steps, body, c))(init)
  return {name: np.asarray(v) for name, v in out.items()}


def ceil_text(x: float) -> str:
  """`x >= 0` rounded up to 2 significant digits (never in our favour)."""
  if x == 0 or not math.isfinite(x):
    return f"{x:g}"
  scale = 10.0 ** (math.floor(math.log10(x)) - 1)
  units = math.ceil(x / scale)
  while True:
    text = f"{units * scale:.2g}"
    if float(text) >= x:
      return text
    units += 1


def summarize(final: np.ndarray, ref: tuple[np.ndarray, np.ndarray],
              start: np.ndarray, moved: np.ndarray) -> dict[str, Any]:
  """Progress ratio figures over the elements of one cell; `ref` is the
  compensated reference `(hi, lo)`, its progress taken without rounding
  `hi + lo` to float64 first."""
  start = start.astype(np.float64)
  exact = (ref[0] - start) + ref[1]
  ratio = (final.astype(np.float64) - start) / exact
  err = np.abs(ratio - 1)
  return {
      "ratio_median": float(np.median(ratio)),
      "ratio_min": float(ratio.min()),
      "ratio_max": float(ratio.max()),
      "error_max": float(err.max()),
      "error_median": float(np.median(err)),
      "stalled_fraction": float(np.mean(~moved)),
  }


def measure(cfg: dict[str, Any], noise: float,
            seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
  rng = np.random.default_rng(seed)
  gaps = np.asarray(cfg["gaps"], np.float64)[:, None]
  m = cfg["elements"]
  e0 = rng.uniform(1.0, 2.0, (len(gaps), m)).astype(np.float32)
  sign = rng.choice([-1.0, 1.0], (len(gaps), m))
  p = (e0.astype(np.float64) * (1 + sign * gaps)).astype(np.float32)
  sigma = (noise * gaps * e0).astype(np.float32)
  seeds = (np.arange(1, e0.size + 1, dtype=np.uint64) * 2654435761 % 2**32).astype(
      np.uint32).reshape(e0.shape)

  records, checks, timings = [], [], []
  for w in cfg["weights"]:
    steps = int(min(round(HORIZONS / w), cfg["max_steps"]))
    every = tuple(k for k in cfg["every"] if k * w <= 0.1 and k <= steps // 10)
    t0 = time.perf_counter()
    out = run_one_weight(w, steps, every, e0, p, sigma, seeds)
    timings.append({"w": w, "steps": steps, "seconds": time.perf_counter() - t0})
    ref = (out["ref_hi"], out["ref_lo"])
    # The compensated reference against the closed form (fixed target).
    w64 = 1.0 - (1.0 - w)
    closed = (p.astype(np.float64) - e0) * -math.expm1(steps * math.log1p(-w64))
    ref_err = np.abs(((ref[0][0] - e0) + ref[1][0]) / closed - 1)
    checks.append({"w": w, "steps": steps,
                   "reference_vs_closed_form_error_max": float(ref_err.max())})
    storages = [("float32", 1, out["f32"], ref, out["moved_f32"], np.float32(1.0 - (1.0 - w))),
                ("float64", 1, out["f64"], ref, out["moved_f64"], None)]
    for k in every:
      storages.append((f"float32 every {k}", k, out[f"f32_{k}"],
                       (out[f"ref_hi_{k}"], out[f"ref_lo_{k}"]), out[f"moved_{k}"],
                       np.float32(weight_every(w, k))))
    for storage, k, final, reference, moved, w_stored in storages:
      for t, target in enumerate(TARGETS):
        for g, gap in enumerate(cfg["gaps"]):
          rec = {"w": w, "decay": 1.0 - w, "gap": gap, "target": target,
                 "storage": storage, "update_every": k, "steps": steps,
                 "horizons": steps * w, "elements": m,
                 "noise": noise if target == "noisy" else 0.0}
          rec |= summarize(final[t, g], (reference[0][t, g], reference[1][t, g]), e0[g],
                           moved[t, g])
          if target == "fixed":
            rec["final_distance_rel_median"] = float(np.median(
                np.abs(p[g].astype(np.float64) - final[t, g]) / e0[g]))
            if w_stored is not None:
              lost = predicted_first_step_lost(e0[g], p[g], w_stored)
              rec["predicted_stalled_fraction"] = float(lost.mean())
              rec["prediction_disagreements"] = int(np.sum(lost != ~moved[t, g]))
          records.append(rec)
  return records, checks, timings


def threshold_scan(cfg: dict[str, Any], seed: int = 3) -> list[dict[str, Any]]:
  """One float32 step at relative gaps `x * 2**-24 / w`: the share of elements
  whose increment is lost, measured, by the half-ulp rule (per element), and
  by the formula `clip(1 / x - 1, 0, 1)` for `e` uniform in [1, 2) (ulp 2**-23).
  With a fixed target a lost first step is lost for good: nothing changes."""
  rng = np.random.default_rng(seed)
  m = cfg["scan_elements"]
  out = []
  for w in cfg["weights"]:
    w32 = np.float32(1.0 - (1.0 - w))
    gaps = np.asarray(SCAN)[:, None] * HALF_ULP / w
    e0 = rng.uniform(1.0, 2.0, (len(SCAN), m)).astype(np.float32)
    sign = rng.choice([-1.0, 1.0], e0.shape)
    p = (e0.astype(np.float64) * (1 + sign * gaps)).astype(np.float32)
    e1 = np.asarray(jax.jit(lambda e, p: e + w32 * (p - e))(e0, p))
    lost = e1 == e0
    for i, x in enumerate(SCAN):
      rule = predicted_first_step_lost(e0[i], p[i], w32)
      out.append({"w": w, "x": x, "gap": float(gaps[i, 0]), "elements": m,
                  "lost_measured": float(lost[i].mean()), "lost_rule": float(rule.mean()),
                  "lost_formula": min(max(1 / x - 1, 0.0), 1.0),
                  "disagreements": int(np.sum(rule != lost[i]))})
  return out


def engine_check(cfg: dict[str, Any], steps_cap: int = 1000) -> list[dict[str, Any]]:
  """`ema_jax.ema` (as installed) against the float32 reference, bit for bit."""
  try:
    import ema_jax
  except Exception as exc:  # a core mid-rewrite must not stop the measurement
    return [{"error": f"import: {exc!r}"}]
  rng = np.random.default_rng(1)
  gaps = np.asarray(cfg["gaps"], np.float64)[:, None]
  e0 = rng.uniform(1.0, 2.0, (len(gaps), cfg["elements"])).astype(np.float32)
  p = (e0.astype(np.float64) * (1 + gaps)).astype(np.float32)
  results = []
  for w in cfg["weights"]:
    steps = int(min(round(HORIZONS / w), steps_cap))
    decay = 1.0 - w
    rec: dict[str, Any] = {"w": w, "decay": decay, "steps": steps, "elements": e0.size}
    try:
      tx = ema_jax.ema(decay)
      pj, zeros = jnp.asarray(p), jnp.zeros_like(jnp.asarray(p))

      @jax.jit
      def engine(e_init):
        state = tx.init(e_init)
        def step(state, _):
          return tx.update(zeros, state, pj)[1], None
        return ema_jax.ema_params(jax.lax.scan(step, state, None, length=steps)[0])

      w32 = jnp.float32(1.0 - decay)

      @jax.jit
      def reference(e):
        return jax.lax.fori_loop(0, steps, lambda _, e: e + w32 * (pj - e), e)

      got = np.asarray(engine(jnp.asarray(e0)))
      want = np.asarray(reference(jnp.asarray(e0)))
      ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32))
      rec |= {"bitwise_equal": int(np.sum(got == want)), "max_ulps": int(ulps.max())}
    except Exception as exc:
      rec["error"] = repr(exc)
    results.append(rec)
  return results


# --------------------------------------------------------------------------
# Report


def format_error(rec: dict[str, Any]) -> str:
  """Worst |ratio - 1| rounded up to 2 digits; `sN%` = elements that never
  moved, rounded up to a whole percent."""
  text = ceil_text(rec["error_max"])
  if rec["stalled_fraction"] > 0:
    text += f" s{math.ceil(rec['stalled_fraction'] * 100 - 1e-9)}%"
  return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _gap_header(gaps) -> list[str]:
  return [f"gap {g:.0e}" for g in gaps]


def report(cfg: dict[str, Any], records: list[dict], checks: list[dict],
           scan: list[dict], engine: list[dict], info: dict[str, Any], noise: float,
           seconds: float) -> str:
  by = {(r["w"], r["gap"], r["target"], r["storage"]): r for r in records}
  steps = {c["w"]: c["steps"] for c in checks}
  gaps = cfg["gaps"]
  out = ["# float32 moving average: increments below half an ulp", ""]
  out.append(f"Machine: {info['cpu_model']}, {info['cpu_count']} CPUs, jax {info['jax']} "
             f"({info['jax_backend']}; float32 update rounded {info['update_rounding']}), "
             f"numpy {info['numpy']}. {cfg['elements']} elements per cell, e0 uniform in "
             f"[1, 2), p = e0 (1 +- gap); noisy target p_t = p + {noise:g} gap e0 u_t "
             f"(u_t uniform, unit variance). Total {seconds:.1f} s.")
  out += ["", "## Theory: `w |p - e| < ulp(e) / 2` loses the increment", ""]
  rows = []
  for w in cfg["weights"]:
    lo, hi = threshold_band(w)
    rows.append([f"{w:.0e}", f"{1 - w:.7g}", f"{steps[w]} ({steps[w] * w:.3g})",
                 f"{lo:.3g} .. {hi:.3g}"])
  out += _table(["w = 1 - decay", "decay", "steps (horizons)",
                 "relative gap lost: all .. none (|e| in [1, 2))"], rows)
  out += ["", "## Threshold scan: share of first-step increments lost", "",
          f"Relative gap = x 2**-24 / w; {cfg['scan_elements']} elements per cell. "
          "Cells: measured (formula 1/x - 1 for e uniform in [1, 2), clipped to [0, 1]).", ""]
  rows = []
  for w in cfg["weights"]:
    cells = {r["x"]: r for r in scan if r["w"] == w}
    rows.append([f"{w:.0e}"] + [f"{cells[x]['lost_measured']:.3f} ({cells[x]['lost_formula']:.3f})"
                                for x in SCAN])
  out += _table(["w"] + [f"x {x:g}" for x in SCAN], rows)
  legend = ("Cells: worst |stored progress / exact progress - 1| over the elements, "
            "rounded up; sN% = share of elements that never moved (rounded up). "
            "1 s100% = stalled.")
  for storage, title in (("float32", "float32 average (the engine's update)"),
                         ("float64", "float64 average (x64 on)")):
    out += ["", f"## {title}", "", legend, ""]
    rows = []
    for w in cfg["weights"]:
      for target in TARGETS:
        rows.append([f"{w:.0e}", target]
                    + [format_error(by[(w, g, target, storage)]) for g in gaps])
    out += _table(["w", "target"] + _gap_header(gaps), rows)
  out += ["", "## Smallest update_every k whose first increment is >= half an ulp", "",
          "For every |e| in [1, 2): 1 - decay**k >= 2**-24 / gap (theory).", ""]
  rows = []
  for w in cfg["weights"]:
    ks = [k_for_half_ulp(w, g) for g in gaps]
    rows.append([f"{w:.0e}"] + ["none" if k is None else str(k) for k in ks])
  out += _table(["w"] + _gap_header(gaps), rows)
  out += ["", "## float32 average with update_every=k (w_k = 1 - decay**k)", "",
          "Against the exact average of the same k-th-step sequence. Cells: fixed / noisy.", ""]
  rows = []
  for w in cfg["weights"]:
    for k in sorted({r["update_every"] for r in records if r["w"] == w and r["update_every"] > 1}):
      name = f"float32 every {k}"
      rows.append([f"{w:.0e}", str(k)] + [
          f"{format_error(by[(w, g, 'fixed', name)])} / {format_error(by[(w, g, 'noisy', name)])}"
          for g in gaps])
  out += _table(["w", "k"] + _gap_header(gaps), rows)
  fixed = [r for r in records if "prediction_disagreements" in r]
  n = sum(r["elements"] for r in fixed)
  bad = sum(r["prediction_disagreements"] for r in fixed)
  n_scan = sum(r["elements"] for r in scan)
  bad_scan = sum(r["disagreements"] for r in scan)
  worst_ref = max(c["reference_vs_closed_form_error_max"] for c in checks)
  out += ["", "## Checks", "",
          f"- Half-ulp rule (per element, ulp on p's side) vs measured: threshold scan "
          f"{n_scan - bad_scan} of {n_scan} elements agree; never-moved elements of the "
          f"fixed-target runs (float32 and every k) {n - bad} of {n}.",
          f"- Compensated float64 reference vs closed form (fixed target): worst relative "
          f"error {ceil_text(worst_ref)}."]
  for e in engine:
    if "error" in e:
      out.append(f"- ema_jax.ema vs `e + float32(w) (p - e)`: w={e.get('w')}: {e['error']}")
    else:
      out.append(f"- ema_jax.ema vs `e + float32(w) (p - e)`, w={e['w']:.0e}, {e['steps']} "
                 f"steps: {e['bitwise_equal']} of {e['elements']} bitwise equal, max "
                 f"{e['max_ulps']} ulps.")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny grid, a few seconds")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "precision.json"))
  parser.add_argument("--noise", type=float, default=1.0,
                      help="noisy target's standard deviation, in units of the gap")
  parser.add_argument("--no-engine", action="store_true", help="skip the ema_jax check")
  args = parser.parse_args(argv)
  cfg = SMOKE if args.smoke else FULL
  info = machine_info()
  t0 = time.perf_counter()
  records, checks, timings = measure(cfg, args.noise)
  scan = threshold_scan(cfg)
  engine = [] if args.no_engine else engine_check(cfg)
  seconds = time.perf_counter() - t0
  print(report(cfg, records, checks, scan, engine, info, args.noise, seconds))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"config": {**cfg, "horizons": HORIZONS, "noise": args.noise, "scan": list(SCAN),
                          "smoke": args.smoke, "targets": list(TARGETS)},
               "machine": info, "records": records, "checks": checks,
               "threshold_scan": scan, "engine_check": engine, "timings": timings,
               "seconds": seconds}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
