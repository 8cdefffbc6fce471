"""ema_jax demo: a small Flax CNN on scikit-learn's digits, raw weights against their EMA.

Noisy SGD (Gaussian noise added to every gradient) makes the raw weights
jitter around a good solution; their exponential moving average sits closer
to its centre. Each epoch the test accuracy of both is measured, the EMA
through `ema_jax.flax.SwapEMAWeights` (Keras' callback of the same name).

Run with `make demo` (or `python examples/demo.py --epochs 3`). The data ships
with scikit-learn: nothing is downloaded. Everything it writes goes under
`./demo_output/`: a plot (`demo.png`), the test accuracies per epoch with the
machine that measured them (`accuracy.json`, which the documentation's figure
plots) and an Orbax checkpoint of the EMA weights alone (`ema_weights/`), ready
for inference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import ema_jax
import ema_jax.flax

BATCH = 16
LEARNING_RATE = 0.1
GRAD_NOISE = 0.05  # variance of the Gaussian noise added to every gradient
# The warm-up lets the EMA follow the fast early progress, then it settles at
# 0.995 (a horizon of ~200 steps, ~2.5 epochs).
DECAY = ema_jax.warmup_decay(0.995, power=3 / 4)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--out", default="demo_output", help="output folder")
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]  # (n, 8, 8, 1)
  x_train, x_test, y_train, y_test = train_test_split(
      x, digits.target, test_size=0.3, random_state=0
  )

  model = CNN()
  params = model.init(jax.random.key(0), x_train[:1])["params"]
  tx = optax.chain(
      optax.add_noise(GRAD_NOISE, 0.0, 0),  # high-noise SGD: the case EMA is for
      optax.sgd(LEARNING_RATE),
      ema_jax.ema(DECAY),  # last in the chain: it averages the updated params
  )
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  hook = ema_jax.flax.SwapEMAWeights()

  # Donating the state updates the EMA in place: it never exists twice.
  def train_step(state, x, y):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  train_step = jax.jit(train_step, donate_argnums=0)

  @jax.jit
  def accuracy(state, x, y):
    logits = state.apply_fn({"params": state.params}, x)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  rng = np.random.default_rng(0)
  steps_per_epoch = len(x_train) // BATCH
  start = time.perf_counter()
  rows = []
  with tqdm(total=args.epochs * steps_per_epoch, desc="training", unit="step") as bar:
    for epoch in range(1, args.epochs + 1):
      order = rng.permutation(len(x_train))
      for i in range(steps_per_epoch):
        idx = order[i * BATCH : (i + 1) * BATCH]
        state = train_step(state, x_train[idx], y_train[idx])
        bar.update()
      raw = float(accuracy(state, x_test, y_test))
      state = hook.on_test_begin(state)  # the EMA weights go in: exact, no copy
      avg = float(accuracy(state, x_test, y_test))
      state = hook.on_test_end(state)  # and the raw weights come back
      rows.append((epoch, raw, avg))
      bar.set_postfix(raw=f"{raw:.3f}", ema=f"{avg:.3f}")
  seconds = time.perf_counter() - start

  print(f"\n{'epoch':>5}  {'raw acc':>8}  {'EMA acc':>8}")
  for epoch, raw, avg in rows:
    print(f"{epoch:>5}  {raw:>8.4f}  {avg:>8.4f}")
  last = rows[-4:]
  raw_mean = np.mean([r for _, r, _ in last])
  ema_mean = np.mean([a for _, _, a in last])
  print(
      f"\nlast {len(last)} epochs, mean test accuracy: raw {raw_mean:.4f}, "
      f"EMA {ema_mean:.4f} ({seconds:.1f} s on {jax.devices()[0].platform})"
  )

  with open(os.path.join(out, "accuracy.json"), "w") as f:
    json.dump(
        {
            "epochs": args.epochs,
            "rows": [{"epoch": e, "raw": r, "ema": a} for e, r, a in rows],
            "seconds": round(seconds, 1),
            "machine": {
                "backend": jax.devices()[0].platform,
                "device": jax.devices()[0].device_kind,
                "cpus": os.cpu_count(),
                "processor": cpu_model(),
                "jax": jax.__version__,
            },
        },
        f,
        indent=1,
    )
  plot = os.path.join(out, "demo.png")
  write_plot(plot, rows, steps_per_epoch)
  print(f"plot: {plot}")

  # The EMA weights alone, for inference (Keras' finalize_variable_values).
  weights = os.path.join(out, "ema_weights")
  shutil.rmtree(weights, ignore_errors=True)
  ema_jax.flax.export_ema(state, directory=weights)
  print(f"EMA weights (Orbax checkpoint): {weights}")


def cpu_model() -> str:
  """The CPU's name (Linux), for the record of what measured the accuracies."""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      return names[0]
  return platform.processor() or platform.machine()


def write_plot(path: str, rows: list[tuple[int, float, float]], steps_per_epoch: int) -> None:
  import matplotlib

  matplotlib.use("Agg")  # files only: no display needed
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  epochs = [e for e, _, _ in rows]
  steps = np.arange(len(rows) * steps_per_epoch)
  decays = np.asarray(jax.vmap(DECAY)(jnp.asarray(steps, jnp.int32)))
  fig, (acc, dec) = plt.subplots(1, 2, figsize=(10, 4))
  acc.plot(epochs, [r for _, r, _ in rows], "o-", label="raw weights")
  acc.plot(epochs, [a for _, _, a in rows], "o-", label="EMA weights")
  acc.set(xlabel="epoch", ylabel="test accuracy", title="Digits, noisy SGD")
  acc.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  acc.grid(alpha=0.3)
  acc.legend()
  dec.semilogx(steps + 1, decays)  # log scale: the warm-up is in the first steps
  dec.set(
      xlabel="optimizer step",
      ylabel="EMA decay",
      title="warmup_decay(0.995, power=3/4)",
      ylim=(0.0, 1.0),
  )
  dec.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
