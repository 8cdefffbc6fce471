"""ema_jax demo: noisy SGD on scikit-learn's digits, raw weights against their EMA.

Run with `make demo`. The data ships with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import ema_jax

EPOCHS = 20
BATCH = 16
LEARNING_RATE = 0.3
GRAD_NOISE = 0.05  # variance of the Gaussian noise added to every gradient


def init_mlp(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
    params.append({"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)})
  return params


def predict(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(predict(params, x), y).mean()


def main() -> None:
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, digits.target, test_size=0.3, random_state=0
  )

  # The EMA goes last in the chain; the warm-up lets it follow the fast early
  # progress, then settle at 0.995 (a horizon of ~200 steps, ~2 epochs).
  tx = optax.chain(
      optax.add_noise(GRAD_NOISE, 0.0, 0),  # high-noise SGD: the case EMA is for
      optax.sgd(LEARNING_RATE),
      ema_jax.ema(ema_jax.warmup_decay(0.995, power=3 / 4)),
  )
  params = init_mlp(jax.random.key(0), [64, 128, 10])
  opt_state = tx.init(params)

  # Donating the optimizer state updates the EMA in place: it never exists twice.
  def train_step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  train_step = jax.jit(train_step, donate_argnums=(0, 1))

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(predict(params, x), -1) == y)

  rng = np.random.default_rng(0)
  steps_per_epoch = len(x_train) // BATCH
  start = time.perf_counter()
  rows = []
  with tqdm(total=EPOCHS * steps_per_epoch, desc="training", unit="step") as bar:
    for epoch in range(1, EPOCHS + 1):
      order = rng.permutation(len(x_train))
      for i in range(steps_per_epoch):
        idx = order[i * BATCH : (i + 1) * BATCH]
        params, opt_state = train_step(params, opt_state, x_train[idx], y_train[idx])
        bar.update()
      raw = float(accuracy(params, x_test, y_test))
      # Evaluate with the EMA, then swap back: exact, nothing copied.
      ema_weights, swapped = ema_jax.swap(params, opt_state)
      avg = float(accuracy(ema_weights, x_test, y_test))
      params, opt_state = ema_jax.swap(ema_weights, swapped)
      rows.append((epoch, raw, avg))
      bar.set_postfix(raw=f"{raw:.3f}", ema=f"{avg:.3f}")

  print(f"\n{'epoch':>5}  {'raw acc':>8}  {'EMA acc':>8}")
  for epoch, raw, avg in rows:
    print(f"{epoch:>5}  {raw:>8.4f}  {avg:>8.4f}")
  raw_mean = np.mean([r for _, r, _ in rows[-4:]])
  ema_mean = np.mean([a for _, _, a in rows[-4:]])
  print(
      f"\nlast 4 epochs, mean test accuracy: raw {raw_mean:.4f}, EMA {ema_mean:.4f}"
      f" ({time.perf_counter() - start:.1f} s on {jax.devices()[0].platform})"
  )


if __name__ == "__main__":
  main()
