"""What differs between the JAX versions ema_jax supports (jax 0.5.3 and newer).

Every version-dependent name is looked up here, once, by feature where one
can be detected, so the rest of the package (and the tests) call one name
that exists on every supported JAX.
"""

from __future__ import annotations

from typing import Any

import jax

# Memory kinds: `jax.memory` (memory spaces of traced values, which
# `jax.device_put` moves between inside `jit`) arrived in jax 0.7.1, but before
# 0.10.2 a 'pinned_host' EMA stays in device memory or fails to compile (jax
# 0.10.0 and 0.10.1 fail tests/test_offload.py). There is no feature to detect,
# so the version decides, here only; older versions refuse `memory_kind`.
MEMORY_KINDS_FROM = (0, 10, 2)
MEMORY_SPACES = tuple(jax.__version_info__) >= MEMORY_KINDS_FROM


def require_memory_spaces(name: str, value: Any) -> None:
  """Refuses `name=value` (a memory kind) on a jax older than 0.10.2."""
  if not MEMORY_SPACES:
    raise ValueError(
        f"`{name}={value!r}` needs jax 0.10.2 or newer (older versions place "
        f"memory kinds wrongly inside `jit`); this is jax {jax.__version__}. "
        f"Upgrade jax, or pass {name}=None to keep the EMA where the params are."
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
  return jax.sharding.use_mesh(mesh)  # type: ignore[attr-defined]  # jax < 0.7
