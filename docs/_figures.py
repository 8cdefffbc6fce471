"""The documentation's figures, drawn from the repo's code and recorded runs.

`docs/_hooks.py` calls `render_all()` on every `mkdocs build` (so `make docs`
and `make test` draw them; about 5 s), and the site serves them as
`figures/<name>.svg`. Run `python docs/_figures.py OUT_DIR` to write them to a
folder instead. Where a figure plots a measured run, the run's data is the
committed output of the script that measured it; the figure's caption on its
page names that script and the machine:

- `demo-accuracy.svg`: `docs/figures/demo_accuracy.json`, the `accuracy.json`
  that `make demo` (`examples/demo.py`) writes.
- `benchmark-ratios.svg`: the table under "What the EMA costs in a training
  step" in `docs/benchmarks.md`, from `benchmarks/models.py`; the chart reads
  the page's own table, so the two cannot disagree.
- `decay-schedules.svg`, `posthoc-profiles.svg`: computed here with ema_jax's
  schedules and `ema_jax.posthoc.solve_weights`; no measurement.
"""

from __future__ import annotations

import io
import json
import pathlib
import re
import sys

import numpy as np

DOCS = pathlib.Path(__file__).resolve().parent

# Steps for the schedule and post-hoc figures.
STEPS = 10_000


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  plt.rcParams.update({
      "svg.fonttype": "none",  # text stays text: small files, the page's font
      "svg.hashsalt": "ema_jax",  # the same SVG for the same figure
      "font.size": 10,
      "axes.grid": True,
      "grid.alpha": 0.3,
      "axes.spines.top": False,
      "axes.spines.right": False,
  })
  return plt


def _svg(fig) -> bytes:
  plt = _pyplot()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
  plt.close(fig)
  return buffer.getvalue()


def profile(schedule, steps: int = STEPS) -> np.ndarray:
  """The weight of each update `k < steps` in the average after `steps` updates.

  Update `k` enters with `1 - decay(k)` and every later update multiplies it
  by its decay; the first update of ema_jax's schedules (decay 0) copies.
  """
  import jax.numpy as jnp

  counts = jnp.arange(steps, dtype=jnp.int32)
  decay = np.asarray(schedule(counts), np.float64)
  weight = np.asarray(schedule.weight(counts), np.float64)
  with np.errstate(divide="ignore"):
    log_decay = np.log(decay)
  later = np.concatenate([np.cumsum(log_decay[::-1])[::-1][1:], [0.0]])
  return weight * np.exp(later)


# The schedules side by side: (label, schedule). Add a new schedule here (one row) and
# it appears in both panels.
def schedules():
  import ema_jax

  return [
      ("constant_decay(0.999)", ema_jax.constant_decay(0.999)),
      ("warmup_decay(0.999, power=3/4)", ema_jax.warmup_decay(0.999, power=3 / 4)),
      ("power_decay(sigma_rel=0.10)", ema_jax.power_decay(sigma_rel=0.10)),
      (f"cosine_decay(0.996, steps={STEPS:,})", ema_jax.cosine_decay(0.996, steps=STEPS)),
      (
          "half_life_decay(64,000 samples,\n  batch_size=64, rampup_ratio=0.05)",
          ema_jax.half_life_decay(64_000, batch_size=64, rampup_ratio=0.05),
      ),
      # BEMA's own EMA (TRL's defaults, averaging at every update): the new params'
      # weight is (lag + t) ** -ema_power at update t = k + 1. BEMA's weights add
      # (lag + t) ** -bias_power times the distance from theta_0 to it.
      ("bema's EMA: (10 + t) ** -0.5\n  (update_freq=1)", _bema_average()),
  ]


def _bema_average():
  import jax.numpy as jnp
  import ema_jax

  def weight(count):
    return (10.0 + (jnp.asarray(count) + 1).astype(jnp.float32)) ** -0.5

  return ema_jax.DecaySchedule(lambda c: 1.0 - weight(c), weight, "bema average")


def decay_schedules() -> bytes:
  import jax.numpy as jnp

  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  steps = np.arange(1, STEPS + 1)
  for label, schedule in schedules():
    weight = np.asarray(schedule.weight(jnp.arange(STEPS, dtype=jnp.int32)), np.float64)
    (line,) = left.loglog(steps, weight, label=label)
    right.plot(steps, profile(schedule) * STEPS, color=line.get_color())
  left.set(xlabel="update", ylabel="1 - decay", ylim=(1e-5, 1.5),
           title="The new params' weight at each update")
  right.set(xlabel="update", ylabel=f"weight × {STEPS:,}", yscale="log", ylim=(1e-2, 20),
            title=f"What each update weighs after {STEPS:,}")
  fig.legend(loc="upper center", ncol=3, frameon=False, bbox_to_anchor=(0.5, 0.0))
  fig.tight_layout()
  return _svg(fig)


def posthoc_profiles() -> bytes:
  import ema_jax

  plt = _pyplot()
  tracked = (0.05, 0.10)
  every = 1000
  target = 0.20
  snapshots = [(t, s) for t in range(every, STEPS + 1, every) for s in tracked]
  gammas = [ema_jax.sigma_rel_to_gamma(s) for _, s in snapshots]
  w = ema_jax.posthoc.solve_weights([t for t, _ in snapshots], gammas, STEPS,
                                    ema_jax.sigma_rel_to_gamma(target))[:, 0]
  synthesized = np.zeros(STEPS)
  for (t, s), weight in zip(snapshots, w):
    synthesized[:t] += weight * profile(ema_jax.power_decay(sigma_rel=s), t)
  steps = np.arange(1, STEPS + 1)
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), width_ratios=(3, 2))
  for s, color in zip(tracked, ("C0", "C1")):
    left.plot(steps, profile(ema_jax.power_decay(sigma_rel=s)) * STEPS, color=color,
              label=f"tracked: sigma_rel={s:.2f}")
    mine = [(t, wi) for (t, si), wi in zip(snapshots, w) if si == s]
    right.bar([t + (-120 if s == tracked[0] else 120) for t, _ in mine], [wi for _, wi in mine],
              width=240, color=color, label=f"sigma_rel={s:.2f} snapshots")
  left.plot(steps, profile(ema_jax.power_decay(sigma_rel=target)) * STEPS, "k", lw=3,
            alpha=0.3, label=f"sigma_rel={target:.2f}, tracked (for reference)")
  left.plot(steps, synthesized * STEPS, "C3--", lw=1.5,
            label=f"sigma_rel={target:.2f}, synthesized post hoc")
  left.set(xlabel="update", ylabel=f"weight × {STEPS:,}",
           title=f"The average after {STEPS:,} updates")
  left.legend(frameon=False, fontsize=9, loc="upper left")
  right.axhline(0, color="k", lw=0.8)
  right.set(xlabel="snapshot (update)", ylabel="weight in the synthesis",
            title=f"{len(snapshots)} snapshots, every {every:,} updates")
  right.legend(frameon=False, fontsize=9, loc="upper left")
  fig.tight_layout()
  return _svg(fig)


def demo_accuracy() -> bytes:
  plt = _pyplot()
  data = json.loads((DOCS / "figures" / "demo_accuracy.json").read_text())
  epochs = [r["epoch"] for r in data["rows"]]
  fig, ax = plt.subplots(figsize=(7, 3.6))
  ax.plot(epochs, [r["raw"] for r in data["rows"]], "o-", label="raw weights")
  ax.plot(epochs, [r["ema"] for r in data["rows"]], "o-", label="EMA weights (ema_jax)")
  ax.set(xlabel="epoch", ylabel="test accuracy", xticks=epochs[1::2],
         title="Digits, a small CNN trained with noisy SGD")
  ax.legend(frameon=False, loc="lower right")
  fig.tight_layout()
  return _svg(fig)


def benchmark_rows(markdown: str) -> list[dict[str, str]]:
  """The rows of the table under "What the EMA costs in a training step"."""
  section = markdown.split("## What the EMA costs in a training step", 1)[1]
  lines = [l for l in section.split("\n## ", 1)[0].splitlines() if l.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  return [dict(zip(header, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]


def benchmark_ratios() -> bytes:
  plt = _pyplot()
  rows = benchmark_rows((DOCS / "benchmarks.md").read_text())
  models = list(dict.fromkeys(r["model"] for r in rows))
  counts = [sum(r["model"] == m for r in rows) for m in models]
  fig, axes = plt.subplots(len(models), 1, figsize=(8, 0.3 * len(rows) + 1.6),
                           height_ratios=counts, sharex=True)
  for ax, model in zip(np.atleast_1d(axes), models):
    mine = [r for r in rows if r["model"] == model]
    plain = lambda text: re.sub("[`*]", "", text)  # noqa: E731
    labels = [f"{plain(r['framework'])}: {plain(r['EMA'])}" for r in mine]
    ratios = [float(r["ratio"].rstrip("x")) for r in mine]
    colors = ["C0" if r["EMA"].startswith("ema_jax") else "C7" for r in mine]
    y = np.arange(len(mine))[::-1]
    ax.barh(y, [r - 1 for r in ratios], left=1, color=colors)
    for yi, r in zip(y, ratios):
      ax.text(max(r, 1) + 0.004, yi, f"{r:.2f}x", va="center", fontsize=9)
    ax.set_yticks(y, labels)
    ax.axvline(1, color="k", lw=0.8)
    ax.set(xlim=(0.95, 1.2), title=f"{model}: step time with the EMA / without")
    ax.grid(axis="y", visible=False)
  ax.set_xlabel("ratio (1.00x: the EMA is free)")
  fig.tight_layout()
  return _svg(fig)


FIGURES = {
    "demo-accuracy.svg": demo_accuracy,
    "decay-schedules.svg": decay_schedules,
    "posthoc-profiles.svg": posthoc_profiles,
    "benchmark-ratios.svg": benchmark_ratios,
}


def render_all() -> dict[str, bytes]:
  return {name: draw() for name, draw in FIGURES.items()}


if __name__ == "__main__":
  out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "figures")
  out.mkdir(parents=True, exist_ok=True)
  for name, content in render_all().items():
    (out / name).write_bytes(content)
    print(f"{out / name}: {len(content):,} bytes")
