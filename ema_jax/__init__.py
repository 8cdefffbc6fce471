"""ema_jax: exponential moving averages of model weights for JAX and optax."""

from ema_jax import presets as presets
from ema_jax._ema import ema as ema
from ema_jax._ema import moving_average as moving_average
from ema_jax._schedules import constant_decay as constant_decay
from ema_jax._schedules import gamma_to_sigma_rel as gamma_to_sigma_rel
from ema_jax._schedules import half_life_decay as half_life_decay
from ema_jax._schedules import power_decay as power_decay
from ema_jax._schedules import sigma_rel_to_gamma as sigma_rel_to_gamma
from ema_jax._schedules import tf_dynamic_decay as tf_dynamic_decay
from ema_jax._schedules import warmup_decay as warmup_decay
from ema_jax._state import EmaState as EmaState
from ema_jax._state import SwappedEmaState as SwappedEmaState
from ema_jax._swap import ema_params as ema_params
from ema_jax._swap import swap as swap
from ema_jax._multi import MultiEmaState as MultiEmaState
from ema_jax._multi import SwappedMultiEmaState as SwappedMultiEmaState
from ema_jax._multi import multi_ema as multi_ema
from ema_jax import posthoc as posthoc
from ema_jax._fused import apply_updates_and_average as apply_updates_and_average

__version__ = "0.1.0"


def __getattr__(name: str):  # PEP 562: `ema_jax.flax` without importing Flax eagerly
  if name == "flax":
    import importlib

    return importlib.import_module("ema_jax.flax")
  raise AttributeError(f"module 'ema_jax' has no attribute {name!r}")

__all__ = [
    "EmaState",
    "SwappedEmaState",
    "constant_decay",
    "ema",
    "ema_params",
    "gamma_to_sigma_rel",
    "half_life_decay",
    "moving_average",
    "power_decay",
    "presets",
    "sigma_rel_to_gamma",
    "swap",
    "tf_dynamic_decay",
    "warmup_decay",
    "MultiEmaState",
    "SwappedMultiEmaState",
    "multi_ema",
    "posthoc",
    "apply_updates_and_average",
]
