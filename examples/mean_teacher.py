"""Mean Teacher on scikit-learn's digits: a student and its EMA teacher, 10% of the labels.

Mean Teacher (Tarvainen and Valpola, NeurIPS 2017) trains a student on the
few labelled images plus a consistency loss: on every image, labelled or not,
the student's predictions are pulled towards those of a teacher whose weights
are the exponential moving average of the student's. Here the teacher is
`ema_jax.ema` at the end of the optax chain, read inside the jitted loss with
`ema_jax.ema_params(opt_state)`: it takes no gradient (the loss is
differentiated with respect to the student's params only), and its momentum
follows BYOL's cosine schedule, `ema_jax.cosine_decay`.

Each epoch prints the test accuracy of the student and of the teacher; the
teacher, an average over the student's recent weights, is the better model.
The data ships with scikit-learn: nothing is downloaded. A plot of both
curves is saved as `mean_teacher_output/mean_teacher.png`.

Run: `python examples/mean_teacher.py` (10 to 25 s on two CPU cores), or
`--smoke` for a two-epoch check.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import ema_jax

LABELLED = 0.1  # the share of the training images whose label is used
HIDDEN = 256
BATCH_LABELLED, BATCH_UNLABELLED = 16, 112
LEARNING_RATE = 1e-2
INPUT_NOISE = 0.3  # std of the Gaussian noise on the inputs
DROPOUT = 0.5
CONSISTENCY = 10.0  # weight of the consistency loss after its ramp-up
RAMPUP_EPOCHS = 5


def init_params(key: jax.Array) -> dict:
  k1, k2 = jax.random.split(key)
  return {  # He initialisation
      "w1": jax.random.normal(k1, (64, HIDDEN)) * np.float32(np.sqrt(2 / 64)),
      "b1": jnp.zeros(HIDDEN, jnp.float32),
      "w2": jax.random.normal(k2, (HIDDEN, 10)) * np.float32(np.sqrt(2 / HIDDEN)),
      "b2": jnp.zeros(10, jnp.float32),
  }


def logits(params: dict, x: jax.Array, key: jax.Array | None) -> jax.Array:
  """An MLP; with `key`, noisy inputs and dropout (both nets see their own noise)."""
  if key is not None:
    k_in, k_drop = jax.random.split(key)
    x = x + INPUT_NOISE * jax.random.normal(k_in, x.shape, x.dtype)
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  if key is not None:
    keep = jax.random.bernoulli(k_drop, 1.0 - DROPOUT, h.shape)
    h = jnp.where(keep, h / (1.0 - DROPOUT), jnp.zeros_like(h))
  return h @ params["w2"] + params["b2"]


def make_train_step(tx: optax.GradientTransformation):
  def loss_fn(params, opt_state, x_lab, y_lab, x_all, key, weight):
    k_student, k_teacher = jax.random.split(key)
    teacher = ema_jax.ema_params(opt_state)  # the EMA weights: no gradient
    x = jnp.concatenate([x_lab, x_all])
    student_logits = logits(params, x, k_student)
    teacher_probs = jax.nn.softmax(logits(teacher, x, k_teacher))
    n = x_lab.shape[0]
    labelled = optax.softmax_cross_entropy_with_integer_labels(
        student_logits[:n], y_lab
    ).mean()
    consistency = jnp.mean(
        jnp.sum((jax.nn.softmax(student_logits) - teacher_probs) ** 2, axis=-1)
    )
    return labelled + weight * consistency

  @jax.jit
  def step(params, opt_state, x_lab, y_lab, x_all, key, weight):
    grads = jax.grad(loss_fn)(params, opt_state, x_lab, y_lab, x_all, key, weight)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


@jax.jit
def accuracy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits(params, x, None), axis=-1) == y)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true", help="two epochs, a quick check")
  parser.add_argument("--out", default="mean_teacher_output", help="output folder")
  args = parser.parse_args()
  epochs = 2 if args.smoke else args.epochs
  start = time.perf_counter()

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, digits.target, test_size=0.3, random_state=0, stratify=digits.target
  )
  # ~10% of the training labels, the same share of every class.
  x_lab, _, y_lab, _ = train_test_split(
      x_train, y_train, train_size=LABELLED, random_state=args.seed,
      stratify=y_train,
  )
  print(f"labels of {len(y_lab)} of the {len(y_train)} training images used; "
        f"{len(y_test)} test images")

  steps_per_epoch = len(x_train) // BATCH_UNLABELLED
  total = epochs * steps_per_epoch
  # BYOL's cosine momentum: the teacher averages over more and more steps.
  momentum = ema_jax.cosine_decay(0.95, 0.995, steps=total)
  tx = optax.chain(optax.adam(LEARNING_RATE), ema_jax.ema(momentum))
  key = jax.random.key(args.seed)
  key, init_key = jax.random.split(key)
  params = init_params(init_key)
  opt_state = tx.init(params)
  step = make_train_step(tx)
  rng = np.random.default_rng(args.seed)

  history = []
  print(f"{'epoch':>5} {'student':>8} {'teacher':>8}")
  for epoch in range(1, epochs + 1):
    order = rng.permutation(len(x_train))
    for i in range(steps_per_epoch):
      t = min(1.0, (epoch - 1 + i / steps_per_epoch) / RAMPUP_EPOCHS)
      weight = CONSISTENCY * float(np.exp(-5.0 * (1.0 - t) ** 2))  # the paper's ramp-up
      lab = rng.integers(0, len(x_lab), BATCH_LABELLED)
      batch = order[i * BATCH_UNLABELLED : (i + 1) * BATCH_UNLABELLED]
      key, sub = jax.random.split(key)
      params, opt_state = step(
          params, opt_state, x_lab[lab], y_lab[lab], x_train[batch], sub,
          jnp.float32(weight),
      )
    student = float(accuracy(params, x_test, y_test))
    teacher = float(accuracy(ema_jax.ema_params(opt_state), x_test, y_test))
    history.append((student, teacher))
    print(f"{epoch:>5} {student:>8.4f} {teacher:>8.4f}")

  students, teachers = np.array(history).T[:, epochs // 2 :]  # the second half
  print(f"epochs {epochs // 2 + 1}-{epochs}, mean test accuracy: student "
        f"{students.mean():.4f}, teacher {teachers.mean():.4f}; the teacher is "
        f"ahead in {int(np.sum(teachers > students))} of {len(students)} epochs")
  print(f"time: {time.perf_counter() - start:.1f} s")

  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  epoch_axis = np.arange(1, epochs + 1)
  ax.plot(epoch_axis, [s for s, _ in history], label="student")
  ax.plot(epoch_axis, [t for _, t in history], label="EMA teacher (ema_jax)")
  ax.set_xlabel("epoch")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"Mean Teacher, digits, {len(y_lab)} labels")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(out, "mean_teacher.png")
  fig.savefig(path, dpi=100)
  print(f"plot: {path}")


if __name__ == "__main__":
  main()
