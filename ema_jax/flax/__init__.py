"""Flax integration: swap the EMA into Linen and NNX models, checkpoint it with Orbax.

This is the only part of ema_jax that imports Flax (and, inside the checkpoint
helpers, Orbax); `import ema_jax` works without them. Import it explicitly:

```python
import ema_jax.flax
```

* `SwapEMAWeights`: Keras 3's callback of the same name, for a Linen
  `TrainState` (returns a new state) or an NNX model and `nnx.Optimizer`
  (acts in place). `ema_weights` is the context-manager form.
* `TrainState` (Linen) and `Optimizer` (NNX): opt-in averaging of
  non-parameter model state (`batch_stats`, `nnx.BatchStat`), which is not
  averaged by default.
* `save_checkpoint`, `restore_checkpoint`: Orbax checkpoints that resume
  bit-exactly, whether they were written with the EMA swapped in or not;
  `export_ema`: the EMA weights alone, for inference.
"""

try:
  import flax as _flax  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
  raise ImportError(
      "`ema_jax.flax` needs Flax (and Orbax for checkpoints): "
      "`pip install flax orbax-checkpoint`, or ema_jax's `flax` extra "
      "(`pip install '.[flax]'` in a clone of ema_jax). "
      "The rest of ema_jax works without them."
  ) from e

from ema_jax.flax._checkpoint import export_ema as export_ema
from ema_jax.flax._checkpoint import restore_checkpoint as restore_checkpoint
from ema_jax.flax._checkpoint import save_checkpoint as save_checkpoint
from ema_jax.flax._hook import SwapEMAWeights as SwapEMAWeights
from ema_jax.flax._hook import ema_weights as ema_weights
from ema_jax.flax._hook import is_swapped as is_swapped
from ema_jax.flax._linen import TrainState as TrainState
from ema_jax.flax._nnx import Optimizer as Optimizer

__all__ = [
    "Optimizer",
    "SwapEMAWeights",
    "TrainState",
    "ema_weights",
    "export_ema",
    "is_swapped",
    "restore_checkpoint",
    "save_checkpoint",
]
