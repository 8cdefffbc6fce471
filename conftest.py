"""Test set-up shared by doctests and tests: several CPU devices, as equinox does.

XLA_FLAGS must be set before jax is first imported, so it lives here, at the root.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (
      flags + " --xla_force_host_platform_device_count=8"
  ).strip()
