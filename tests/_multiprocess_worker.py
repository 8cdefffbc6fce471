"""One process of the multi-process test (tests/test_multiprocess.py), and its example.

Each process runs this file with its id; together they train a sharded MLP
with two EMAs (float32, and bfloat16 with stochastic rounding) and the two
power-function EMAs of a post-hoc `Snapshotter` on a global 2x2 ('data',
'model') mesh spanning both processes, evaluate with the EMA swapped in, save
and restore with Orbax's multi-process checkpointing, train on, snapshot (at
step 4 and, on `close()`, the tail at step 6), synthesize a post-hoc EMA, and
write the shards they hold to `--out`. `train()` is also what the test
runs in a single process for the reference.

  python tests/_multiprocess_worker.py --process-id 0 --num-processes 2 \\
      --port 12345 --out /tmp/out --checkpoint-dir /tmp/ckpt
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ema_jax

# The model: a Megatron-style MLP (column- then row-parallel), the batch split
# over 'data'; each leaf's PartitionSpec.
SPECS = {
    "w1": P("data", "model"),  # FSDP x tensor parallel
    "b1": P("model"),
    "w2": P("model", None),
    "b2": P(),  # replicated
}
SHAPES = {"w1": (8, 32), "b1": (32,), "w2": (32, 4), "b2": (4,)}
STEPS_BEFORE_SAVE, STEPS_AFTER_RESTORE = 3, 3
SNAPSHOT_EVERY = 4  # one snapshot at step 4, and the tail at step 6 on close()
# The sharded results written out, leaf by leaf.
GROUPS = ("params", "ema", "ema_bf16", "tracked", "posthoc_010", "posthoc_020")


def loss_fn(params, batch):
  x, y = batch
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def make_mesh(devices=None):
  """The 2x2 ('data', 'model') mesh; over all processes' devices by default."""
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((2, 2), ("data", "model"), auto, devices=devices)


def replicated_value(x: jax.Array) -> np.ndarray:
  """A replicated result's value, read from this process's own copy."""
  return np.asarray(x.addressable_shards[0].data)


def global_array(value: np.ndarray, mesh, spec) -> jax.Array:
  """A global array from a value every process knows; each places its shards."""
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])


def train(mesh, checkpoint_dir: str) -> dict:
  """Train, evaluate swapped, checkpoint, restore, train on; the final state."""
  import orbax.checkpoint as ocp  # only the test and this example need it

  rng = np.random.default_rng(0)
  params = {
      k: global_array((rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32), mesh, SPECS[k])
      for k, s in SHAPES.items()
  }
  batches = [
      (global_array(rng.normal(size=(16, 8)).astype(np.float32), mesh, P("data", None)),
       global_array(rng.normal(size=(16, 4)).astype(np.float32), mesh, P("data", None)))
      for _ in range(STEPS_BEFORE_SAVE + STEPS_AFTER_RESTORE)
  ]

  # Every process opens the same directory and calls every method: Orbax
  # writes and reads each process's shards.
  snapshot_dir = os.path.join(os.path.abspath(checkpoint_dir), "snapshots")
  snapshotter = ema_jax.posthoc.Snapshotter(
      snapshot_dir, every=SNAPSHOT_EVERY, which=2
  )
  tx = optax.chain(
      optax.adam(1e-2),
      ema_jax.ema(0.9),
      ema_jax.ema(0.9, ema_dtype=jnp.bfloat16, rounding="stochastic", key=0),
      snapshotter.ema(),
  )
  # No shardings passed anywhere: the EMAs follow the params'.
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def eval_step(params, opt_state, batch):
    ema_weights, opt_state = ema_jax.swap(params, opt_state, which=0)
    loss = loss_fn(ema_weights, batch)
    params, opt_state = ema_jax.swap(ema_weights, opt_state, which=0)
    return loss, params, opt_state

  for step, batch in enumerate(batches[:STEPS_BEFORE_SAVE], 1):
    params, opt_state = train_step(params, opt_state, batch)
    snapshotter.maybe_save(opt_state, step=step)
  eval_loss, params, opt_state = eval_step(params, opt_state, batches[0])

  # Every process calls save and restore; each writes and reads its shards.
  path = os.path.join(os.path.abspath(checkpoint_dir), "step_3")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": params, "opt_state": opt_state})
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(
      ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state}
  )
  restored = checkpointer.restore(path, abstract)
  checkpointer.close()
  as_data = lambda a: (
      jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
  )
  same = jax.tree.map(
      lambda a, b: replicated_value(jnp.array_equal(as_data(a), as_data(b))),
      restored, {"params": params, "opt_state": opt_state},
  )
  params, opt_state = restored["params"], restored["opt_state"]

  for step, batch in enumerate(batches[STEPS_BEFORE_SAVE:], STEPS_BEFORE_SAVE + 1):
    params, opt_state = train_step(params, opt_state, batch)
    snapshotter.maybe_save(opt_state, step=step)
  final_loss, params, opt_state = eval_step(params, opt_state, batches[0])
  snapshotter.close()  # writes the tail, step 6
  return {
      "params": params,
      "ema": ema_jax.ema_params(opt_state, which=0),
      "ema_bf16": ema_jax.ema_params(opt_state, which=1),
      # Tracked with sigma_rel 0.10, and the same width synthesized from the
      # snapshots of steps 4 and 6 (it must come back); a width not tracked.
      "tracked": ema_jax.ema_params(opt_state, which=2, index=1),
      "posthoc_010": ema_jax.posthoc.synthesize(snapshot_dir, 0.10, like=params),
      "posthoc_020": ema_jax.posthoc.synthesize(snapshot_dir, 0.20, like=params),
      "snapshot_steps": np.asarray(snapshotter.steps),
      "count": opt_state[1].count,
      "eval_loss": eval_loss,
      "final_eval_loss": final_loss,
      "restored_equal": all(jax.tree.leaves(same)),
  }


def local_shards(result: dict) -> dict[str, np.ndarray]:
  """The shards this process holds, keyed `name|start:stop,...`."""
  out = {}
  for group in GROUPS:
    for name, array in result[group].items():
      assert array.sharding.is_equivalent_to(
          result["params"][name].sharding, array.ndim
      ), (group, name)
      for shard in array.addressable_shards:
        where = ",".join(
            f"{s.start or 0}:{s.stop if s.stop is not None else n}"
            for s, n in zip(shard.index, array.shape)
        )
        out[f"{group}/{name}|{where}"] = np.asarray(
            shard.data.astype(jnp.float32)
        )
  for name in ("count", "eval_loss", "final_eval_loss"):
    out[name] = replicated_value(result[name])
  out["restored_equal"] = np.asarray(result["restored_equal"])
  out["snapshot_steps"] = result["snapshot_steps"]
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--checkpoint-dir", required=True)
  parser.add_argument("--timeout", type=float, default=90)
  args = parser.parse_args()
  # A hung collective must not outlive the test: dump stacks and exit.
  faulthandler.dump_traceback_later(args.timeout, exit=True)

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{args.port}",
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=int(args.timeout),
  )
  assert jax.local_device_count() == 2, jax.local_devices()
  mesh = make_mesh()  # spans both processes
  result = train(mesh, args.checkpoint_dir)
  np.savez(
      os.path.join(args.out, f"process_{args.process_id}.npz"), **local_shards(result)
  )
  jax.distributed.shutdown()
  print(f"process {args.process_id}: done", file=sys.stderr)


if __name__ == "__main__":
  main()
