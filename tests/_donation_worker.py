"""Donated steps with an offloaded EMA state; run by tests/test_offload_donation.py.

`python tests/_donation_worker.py recipes` runs the documented donation
patterns for every kind of offloaded state and prints `ok <case>` for each
(a process abort shows as a missing line); `python tests/_donation_worker.py
reproducer` runs the pure-JAX reproducer of the abort (no ema_jax).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_jax

HOST = "pinned_host"
KINDS = {
    "float32": dict(),
    "debias": dict(debias=True),
    "bfloat16-stochastic-key": dict(ema_dtype=jnp.bfloat16, rounding="stochastic", key=0),
    "float32-of-bfloat16": dict(ema_dtype=jnp.float32),
    "update_every": dict(update_every=2),
}


def params():
  return {
      "w": jnp.arange(12.0).reshape(4, 3),
      "b": jnp.ones(3),
      "h": jnp.ones(3, jnp.bfloat16),
      "n": jnp.arange(3, dtype=jnp.int32),  # carried
      "k": jax.random.key(1),  # carried: stays in device memory
  }


def transformations():
  for name, kw in KINDS.items():
    yield name, ema_jax.ema(0.9, memory_kind=HOST, **kw)
  yield "multi_ema", ema_jax.multi_ema([0.5, 0.9], memory_kind=HOST)
  yield "masked", optax.masked(
      ema_jax.ema(0.9, memory_kind=HOST), {"w": True, "b": False, "h": True, "n": False, "k": False})


def steps(tx):
  def step(p, s):
    grads = jax.tree.map(
        lambda x: None if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        else jnp.ones_like(x) if x.dtype != jnp.int32 else jnp.zeros_like(x), p)
    u, s = tx.update(grads, s, p)
    # The key leaf has no update (None), as a masked optimizer gives it.
    return jax.tree.map(lambda x, v: x if v is None else (x + v).astype(x.dtype), p, u), s

  def passthrough(p, s):  # an eval step that hands the state back
    return p, s

  return {"step": step, "passthrough": passthrough}


def numbers(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x, np.float32)


def shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def recipes():
  for name, ema in transformations():
    tx = optax.chain(optax.sgd(0.1), ema)
    for fn_name, fn in steps(tx).items():
      # (a) donate params and state together, returned first and in order
      p, s = params(), tx.init(params())
      reference = jax.jit(fn)(params(), tx.init(params()))
      f = jax.jit(fn, donate_argnums=(0, 1))
      p, s = f(p, s)
      for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(reference[1])):
        assert a.sharding.memory_kind == b.sharding.memory_kind
        np.testing.assert_array_equal(numbers(a), numbers(b))
      p, s = f(p, s)
      print(f"ok (a) {name} {fn_name}", flush=True)
      # (b) donate the state alone, every placement stated
      p = jax.device_put(params(), jax.devices()[0])
      s = jax.device_put(tx.init(p), shardings(tx.init(p)))
      f = jax.jit(fn, donate_argnums=1, in_shardings=shardings((p, s)),
                  out_shardings=shardings((p, s)))
      p, s = f(p, s)
      p, s = f(p, s)
      print(f"ok (b) {name} {fn_name}", flush=True)


def reproducer():
  # The EMA in host memory, donated alone; the step's first output (device)
  # has its shape and dtype. JAX pairs donated inputs with outputs by shape
  # and dtype only (memory kinds are ignored unless every input and output
  # placement is known), so the host buffer is aliased to the device output.
  device = jax.devices()[0]
  host = jax.sharding.SingleDeviceSharding(device, memory_kind=HOST)
  params = jnp.ones(4)
  ema = jax.device_put(jnp.ones(4), host)
  step = jax.jit(lambda p, e: (p + 1, e), donate_argnums=1)
  print(step(params, ema), flush=True)  # XLA's CPU runtime aborts (SIGABRT) here


if __name__ == "__main__":
  {"recipes": recipes, "reproducer": reproducer}[sys.argv[1]]()
  print("done", flush=True)
