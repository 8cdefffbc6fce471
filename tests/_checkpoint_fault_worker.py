"""A training run that checkpoints every step; tests/test_checkpoint_faults.py kills it.

Run as `python tests/_checkpoint_fault_worker.py DIR STEPS`: resumes from the
latest checkpoint in DIR (if any) and trains to STEPS, saving after every
step and printing `saving N` before each save.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

import ema_jax
import ema_jax.flax

TX = optax.chain(
    optax.add_noise(0.01, 0.55, 0),  # an RNG key in the state
    optax.adam(1e-2),
    ema_jax.multi_ema([ema_jax.warmup_decay(0.99), 0.9], debias=True),
)


def initial_state() -> TrainState:
  key = jax.random.key(0)
  params = {
      "w": jax.random.normal(key, (64, 32)),
      "b": jnp.zeros(32),
      "emb": jax.random.normal(jax.random.fold_in(key, 1), (16, 8)).astype(jnp.bfloat16),
  }
  state = TrainState.create(apply_fn=None, params=params, tx=TX)
  return jax.device_put(state.replace(step=jnp.zeros((), jnp.int32)), jax.devices()[0])


@jax.jit
def train_step(state: TrainState) -> TrainState:
  def loss(params):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), state.step), (4, 64))
    y = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.mean(y**2) + jnp.mean(params["emb"].astype(jnp.float32) ** 2)

  return state.apply_gradients(grads=jax.grad(loss)(state.params))


def main(directory: str, steps: int) -> None:
  state = initial_state()
  with ocp.CheckpointManager(directory) as manager:
    if manager.latest_step() is not None:
      state = ema_jax.flax.restore_checkpoint(manager, state)
    while int(state.step) < steps:
      state = train_step(state)
      print(f"saving {int(state.step)}", flush=True)
      ema_jax.flax.save_checkpoint(manager, int(state.step), state)
    manager.wait_until_finished()
  print("done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
