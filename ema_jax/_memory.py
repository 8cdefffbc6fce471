"""Where the EMA lives: device memory, or host memory next to the device."""

from __future__ import annotations

from typing import Any

import jax

# The memory kinds `ema` accepts, by the names `Device.addressable_memories()`
# reports. JAX places traced values by memory space; 'pinned_host' is the host
# space every backend with host offload exposes (TPU, GPU and CPU).
MEMORY_KINDS = ("device", "pinned_host")


def check_memory_kind(name: str, memory_kind: Any) -> str | None:
  """`memory_kind` validated when the transformation is built."""
  if memory_kind is None:
    return None
  if memory_kind not in MEMORY_KINDS:
    raise ValueError(
        f"`{name}` must be None, 'device' or 'pinned_host' (host offload), "
        f"got {memory_kind!r}."
    )
  return memory_kind


def check_backend_supports(memory_kind: str | None) -> None:
  """A clear error at `init` when the default device lacks `memory_kind`."""
  if memory_kind is None or memory_kind == "device":
    return
  device = jax.devices()[0]
  kinds = [m.kind for m in device.addressable_memories()]
  if memory_kind not in kinds:
    raise ValueError(
        f"`memory_kind={memory_kind!r}`: {device.platform} devices offer only "
        f"{kinds}. Use memory_kind=None to keep the EMA in device memory."
    )


def _space(memory_kind: str) -> Any:
  spaces = {
      "device": jax.memory.Space.Device,
      "pinned_host": jax.memory.Space.Host,
  }
  return spaces[memory_kind]


def put(x: Any, memory_kind: str | None) -> Any:
  """`x` moved to `memory_kind`, sharding unchanged; inside `jit` too.

  The transfer is an op in the traced program, so XLA schedules it (and
  overlaps it with compute) instead of the host blocking on a copy.
  """
  if memory_kind is None or x is None:
    return x
  space = _space(memory_kind)
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
