"""Where the EMA lives: device memory, or host memory next to the device."""

from __future__ import annotations

from typing import Any, Literal, Optional

import jax

from ema_jax import _compat

# Where an average may live, by the names `Device.addressable_memories()`
# reports. JAX places traced values by memory space; 'pinned_host' is the host
# space every backend with host offload exposes (TPU, GPU and CPU).
MemoryKind = Optional[Literal["device", "pinned_host"]]


def put(x: Any, memory_kind: str | None) -> Any:
  """`x` moved to `memory_kind`, sharding unchanged; inside `jit` too.

  The transfer is an op in the traced program, so XLA schedules it (and
  overlaps it with compute) instead of the host blocking on a copy.
  """
  if memory_kind is None or x is None:
    return x
  space = _compat.memory_space(memory_kind)
  if jax.typeof(x).memory_space == space:
    return x
  return jax.device_put(x, space)


def put_tree(tree: Any, memory_kind: str | None) -> Any:
  """Every leaf of `tree` moved to `memory_kind` (`None`: left as it is)."""
  if memory_kind is None:
    return tree
  return jax.tree.map(lambda x: put(x, memory_kind), tree)


def same_memory_as(x: Any, like: Any) -> Any:
  """`x` moved to the memory space that `like` is in."""
  if x is None or like is None:
    return x
  space = getattr(jax.typeof(like), "memory_space", None)
  if space is None or space == jax.typeof(x).memory_space:
    return x
  return jax.device_put(x, space)


def placed_like(x: Any, like: Any) -> Any:
  """`x` where `like` is: with its sharding and memory kind when both are
  concrete arrays; under `jit`, in its memory space (XLA propagates the
  sharding from the operands)."""
  concrete = not isinstance(x, jax.core.Tracer)
  if concrete and isinstance(like, jax.Array) and not isinstance(
      like, jax.core.Tracer
  ):
    return jax.device_put(x, like.sharding)
  return same_memory_as(x, like)
