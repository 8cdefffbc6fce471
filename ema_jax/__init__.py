"""ema_jax: exponential moving averages of model weights for JAX and optax.

Type aliases used in the signatures: `Decay` (a float in [0, 1] or a schedule
`count -> decay`), `Mask` (a tree of bools like the params, a prefix of it, or
a callable returning one), `Rounding` (`'nearest'` or `'stochastic'`) and
`MemoryKind` (`None`, `'device'` or `'pinned_host'`).
"""

from ema_jax import presets as presets
from ema_jax._apply_updates_and_average import (
    apply_updates_and_average as apply_updates_and_average,
)
from ema_jax._bema import BemaState as BemaState
from ema_jax._bema import bema as bema
from ema_jax._ema import ema as ema
from ema_jax._ema import moving_average as moving_average
from ema_jax._ema import multi_ema as multi_ema
from ema_jax._leaves import Mask as Mask
from ema_jax._memory import MemoryKind as MemoryKind
from ema_jax._rounding import Rounding as Rounding
from ema_jax._schedules import Decay as Decay
from ema_jax._schedules import DecaySchedule as DecaySchedule
from ema_jax._schedules import constant_decay as constant_decay
from ema_jax._schedules import cosine_decay as cosine_decay
from ema_jax._schedules import gamma_to_sigma_rel as gamma_to_sigma_rel
from ema_jax._schedules import half_life_decay as half_life_decay
from ema_jax._schedules import power_decay as power_decay
from ema_jax._schedules import scale_decay as scale_decay
from ema_jax._schedules import sigma_rel_to_gamma as sigma_rel_to_gamma
from ema_jax._schedules import tf_dynamic_decay as tf_dynamic_decay
from ema_jax._schedules import uniform_decay as uniform_decay
from ema_jax._schedules import warmup_decay as warmup_decay
from ema_jax._state import EmaState as EmaState
from ema_jax._state import MultiEmaState as MultiEmaState
from ema_jax._state import SwappedEmaState as SwappedEmaState
from ema_jax._state import SwappedMultiEmaState as SwappedMultiEmaState
from ema_jax._state import is_swapped as is_swapped
from ema_jax._swap import blend as blend
from ema_jax._swap import ema_params as ema_params
from ema_jax._swap import reset as reset
from ema_jax._swap import swap as swap
from ema_jax import posthoc as posthoc

__version__ = "0.1.0"


def __getattr__(name: str):  # PEP 562: `ema_jax.flax` without importing Flax eagerly
  if name == "flax":
    import importlib

    return importlib.import_module("ema_jax.flax")
  raise AttributeError(f"module 'ema_jax' has no attribute {name!r}")


__all__ = [
    "BemaState",
    "Decay",
    "DecaySchedule",
    "EmaState",
    "Mask",
    "MemoryKind",
    "MultiEmaState",
    "Rounding",
    "SwappedEmaState",
    "SwappedMultiEmaState",
    "apply_updates_and_average",
    "bema",
    "blend",
    "constant_decay",
    "cosine_decay",
    "ema",
    "ema_params",
    "gamma_to_sigma_rel",
    "half_life_decay",
    "is_swapped",
    "moving_average",
    "multi_ema",
    "posthoc",
    "power_decay",
    "presets",
    "reset",
    "scale_decay",
    "sigma_rel_to_gamma",
    "swap",
    "tf_dynamic_decay",
    "uniform_decay",
    "warmup_decay",
]
