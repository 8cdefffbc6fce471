"""Tests run as equinox's do: strict dtype promotion, several CPU devices.

The device count is set in the root `conftest.py` (XLA_FLAGS must be set
before jax is first imported). Strict promotion makes any implicit dtype
promotion an error, so a float32 average never silently becomes float64 (or
a bfloat16 one float32) by mixing dtypes inside ema_jax. Tests that run
third-party code which is not strict-clean (optax's own transformations on
integer leaves or its int32 step counts, Keras) are marked
`standard_promotion`; every ema_jax call they make is also made under strict
promotion by another test.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
  strict = request.node.get_closest_marker("standard_promotion") is None
  with jax.numpy_dtype_promotion("strict" if strict else "standard"):
    yield
