"""The mistake `swap` can catch when swapping back: the raw params passed in."""

from __future__ import annotations

from typing import Any

from ema_jax import _tree


def refuse_raw_params(path: Any, given: Any, held: Any) -> None:
  """Swapping back with the raw params (held by the state) would lose the EMA.

  `params, state = swap(raw, swapped)` instead of `swap(ema_weights, swapped)`
  would put the raw params where the EMA was. Outside jit the very same array
  object gives the mistake away; under jit nothing can tell.
  """
  if given is held and given is not None:
    raise ValueError(
        f"Leaf {_tree.path_str(path)}: swapping back got the raw params that "
        "the swapped state holds, which would overwrite the EMA with them. "
        "Pass back the EMA weights that `swap` returned: "
        "`params, state = ema_jax.swap(ema_weights, swapped_state)`."
    )
