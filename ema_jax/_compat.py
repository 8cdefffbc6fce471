"""What differs between the JAX versions ema_jax supports (jax 0.5.3 and newer).

Every version-dependent name is looked up here, once, by feature rather than
by version number, so the rest of the package (and the tests) call one name
that exists on every supported JAX.
"""

from __future__ import annotations

from typing import Any

import jax

# `jax.memory` (memory spaces of traced values, which `jax.device_put` moves
# between inside `jit`) arrived in jax 0.7.1. Without it the EMA cannot be
# placed in host memory or moved back, so `memory_kind` is refused by name.
MEMORY_SPACES = hasattr(jax, "memory")


def require_memory_spaces(name: str, value: Any) -> None:
  """Refuses `name=value` (a memory kind) on a JAX without `jax.memory`."""
  if not MEMORY_SPACES:
    raise ValueError(
        f"`{name}={value!r}` needs jax 0.7.1 or newer (`jax.memory`, to move "
        f"arrays between memory spaces inside `jit`); this is jax "
        f"{jax.__version__}. Upgrade jax, or pass {name}=None to keep the EMA "
        "where the params are."
    )


def memory_space(kind: str) -> Any:
  """The `jax.memory.Space` named by a memory kind ('device', 'pinned_host')."""
  require_memory_spaces("memory_kind", kind)
  return {"device": jax.memory.Space.Device,
          "pinned_host": jax.memory.Space.Host}[kind]


def enable_x64(enabled: bool = True) -> Any:
  """A context manager that turns 64-bit types on (or off) inside it:
  `jax.enable_x64` where it exists (jax 0.8 and newer),
  `jax.experimental.enable_x64` before."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(enabled)
  from jax.experimental import enable_x64 as older  # type: ignore[attr-defined]  # jax < 0.8
  return older(enabled)


def set_mesh(mesh: jax.sharding.Mesh) -> Any:
  """A context manager that makes `mesh` the current mesh: `jax.set_mesh`
  where it exists (jax 0.7 and newer), `jax.sharding.use_mesh` before."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)
