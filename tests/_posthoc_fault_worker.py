"""One training run of the post-hoc fault test (tests/test_posthoc_faults.py).

Trains a small model with a `Snapshotter` (a snapshot every `EVERY` steps,
the tail on `close()`) and an Orbax checkpoint of params and optimizer state
every `CHECKPOINT_EVERY` steps, both written asynchronously, and prints
`step <t>` after each step so that the test can kill it with SIGKILL at
random points. Started again on the same directory, it resumes from the
latest complete checkpoint, snapshots the restored step if that snapshot was
lost, and trains on: the snapshots must end up those of an uninterrupted run.

  python tests/_posthoc_fault_worker.py /tmp/run
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import optax

import ema_jax

STEPS, EVERY, CHECKPOINT_EVERY = 43, 5, 7  # snapshots 5, 10, ..., 40 and 43


def slow_snapshot(step: int, seconds: float) -> None:
  """Make the write of snapshot `step` end `seconds` late (a loaded disk), so
  that a checkpoint started after it can finish first."""
  import asyncio

  from orbax.checkpoint._src.path import atomicity

  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  target = os.path.join("snapshots", str(step))

  async def slow(self, *args, **kwargs):
    if str(self.get_final()).endswith(target):
      await asyncio.sleep(seconds)
    return await finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = slow


def snapshot_dir(directory: str) -> str:
  return os.path.join(directory, "snapshots")


def run(directory: str, log=None) -> None:
  """Train to `STEPS`, resuming from the latest checkpoint in `directory`."""
  import orbax.checkpoint as ocp

  # The same run, started again: it redoes the snapshots it finds.
  snapshotter = ema_jax.posthoc.Snapshotter(
      snapshot_dir(directory), every=EVERY, existing="resume"
  )
  tx = optax.chain(optax.sgd(0.05), snapshotter.ema())
  params = {"w": jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32), "b": jnp.zeros(4)}
  opt_state = tx.init(params)
  checkpoints = ocp.CheckpointManager(
      os.path.join(directory, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
  )
  start = checkpoints.latest_step() or 0
  if start:
    abstract = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state}
    )
    restored = checkpoints.restore(start, args=ocp.args.StandardRestore(abstract))
    params, opt_state = restored["params"], restored["opt_state"]
    # Its snapshot may have been lost with the process: write it again.
    snapshotter.maybe_save(opt_state, step=start)

  @jax.jit
  def train_step(params, opt_state, t):
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p + 0.1 * t.astype(p.dtype)), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  if log:
    print(f"start {start}", file=log, flush=True)
  for t in range(start + 1, STEPS + 1):
    params, opt_state = train_step(params, opt_state, jnp.int32(t))
    snapshotter.maybe_save(opt_state, step=t)
    if t % CHECKPOINT_EVERY == 0:
      # The snapshots first: a checkpoint that finished before them would be
      # resumed from with a snapshot lost for good (docs/posthoc.md).
      snapshotter.wait_until_finished()
      checkpoints.save(
          t, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state})
      )
    if log:
      print(f"step {t}", file=log, flush=True)
  snapshotter.close()  # the tail, step 43
  checkpoints.close()
  if log:
    print("done", file=log, flush=True)


if __name__ == "__main__":
  if os.environ.get("EMA_JAX_SLOW_SNAPSHOT"):  # "<step>:<seconds>"
    step, seconds = os.environ["EMA_JAX_SLOW_SNAPSHOT"].split(":")
    slow_snapshot(int(step), float(seconds))
  run(sys.argv[1], log=sys.stdout)
