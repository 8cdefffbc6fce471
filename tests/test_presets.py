"""Presets against independent float64 re-implementations of each library's code.

Each reference below follows the structure of the library it stands for (the
class, its counters, where they are read and incremented, and how its training
script calls it), written in numpy float64 from the sources quoted in the
comments. Both sides see the same float32 parameter trajectory: random
gradients through `optax.sgd`, replayed into the reference's "model" the way
the library's optimizer step would change it. The EMA (and, for Keras'
overwrite, the params) are compared after every step.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_jax
from ema_jax import presets

LR = 0.1
RTOL = 1e-5
ATOL = 1e-6


# ---------------------------------------------------------------------------
# A "model": a list of float64 arrays mutated in place, like torch/tf variables.


class _Model:

  def __init__(self, leaves: list[np.ndarray]):
    self.params = [np.array(x, np.float64) for x in leaves]

  def state_dict_values(self) -> list[np.ndarray]:
    return self.params


def _lerp_(tgt: np.ndarray, end: np.ndarray, weight: float) -> None:
  # ATen's lerp kernel (Lerp.h), used by timm's `lerp_` and ema-pytorch.
  if abs(weight) < 0.5:
    tgt[...] = tgt + weight * (end - tgt)
  else:
    tgt[...] = end - (end - tgt) * (1.0 - weight)


# ---------------------------------------------------------------------------
# timm: huggingface/pytorch-image-models timm/utils/model_ema.py, ModelEmaV3
# (commits 0a044bf4, 7479d451; `get_decay` unchanged in the timm 1.0.31
# wheel), called from train.py as
# `num_updates += 1; model_ema.update(model, step=num_updates)`.


class TimmModelEmaV3Ref:

  def __init__(
      self,
      model: _Model,
      decay: float = 0.9999,
      min_decay: float = 0.0,
      update_after_step: int = 0,
      use_warmup: bool = False,
      warmup_gamma: float = 1.0,
      warmup_power: float = 2 / 3,
  ):
    self.module = copy.deepcopy(model)
    self.decay = decay
    self.min_decay = min_decay
    self.update_after_step = update_after_step
    self.use_warmup = use_warmup
    self.warmup_gamma = warmup_gamma
    self.warmup_power = warmup_power

  def get_decay(self, step: int | None = None) -> float:
    if step is None:
      return self.decay
    step = max(0, step - self.update_after_step - 1)
    if step <= 0:
      return 0.0
    if self.use_warmup:
      decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
      decay = max(min(decay, self.decay), self.min_decay)
    else:
      decay = self.decay
    return decay

  def update(self, model: _Model, step: int | None = None) -> None:
    decay = self.get_decay(step)
    self.apply_update_(model, decay)

  def apply_update_(self, model: _Model, decay: float) -> None:
    for ema_v, model_v in zip(
        self.module.state_dict_values(), model.state_dict_values()
    ):
      _lerp_(ema_v, model_v, 1.0 - decay)

  @property
  def ema(self) -> list[np.ndarray]:
    return self.module.params


class TimmTrainLoopRef:
  """timm's train_one_epoch: the EMA is updated after each optimizer step."""

  def __init__(self, model: _Model, **kwargs: Any):
    self.model = model
    self.model_ema = TimmModelEmaV3Ref(model, **kwargs)
    self.num_updates = 0

  def train_step(self, optimizer_step: Callable[[], None]) -> None:
    optimizer_step()
    self.num_updates += 1
    self.model_ema.update(self.model, step=self.num_updates)

  @property
  def ema(self) -> list[np.ndarray]:
    return self.model_ema.ema


# ---------------------------------------------------------------------------
# diffusers: huggingface/diffusers src/diffusers/training_utils.py, EMAModel
# at commit 953dcb1d (`get_decay` unchanged in the diffusers 0.42.0 wheel), whose no-warm-up branch is `(1 + step) / (10 + step)`.
# (A copy stored as commit 0623b186 has `self.decay` there instead; 953dcb1d
# is the newer file, and the copies in other projects that use `self.decay`
# keep the ramp as a commented-out line, so the ramp is upstream's.) The
# example scripts call `ema_unet.step(unet.parameters())` after
# `optimizer.step()`.


class DiffusersEMAModelRef:

  def __init__(
      self,
      parameters: list[np.ndarray],
      decay: float = 0.9999,
      min_decay: float = 0.0,
      update_after_step: int = 0,
      use_ema_warmup: bool = False,
      inv_gamma: float = 1.0,
      power: float = 2 / 3,
  ):
    parameters = list(parameters)
    self.shadow_params = [p.copy() for p in parameters]
    self.decay = decay
    self.min_decay = min_decay
    self.update_after_step = update_after_step
    self.use_ema_warmup = use_ema_warmup
    self.inv_gamma = inv_gamma
    self.power = power
    self.optimization_step = 0
    self.cur_decay_value = None

  def get_decay(self, optimization_step: int) -> float:
    step = max(0, optimization_step - self.update_after_step - 1)
    if step <= 0:
      return 0.0
    if self.use_ema_warmup:
      cur_decay_value = 1 - (1 + step / self.inv_gamma) ** -self.power
    else:
      cur_decay_value = (1 + step) / (10 + step)
    cur_decay_value = min(cur_decay_value, self.decay)
    cur_decay_value = max(cur_decay_value, self.min_decay)
    return cur_decay_value

  def step(self, parameters: list[np.ndarray]) -> None:
    parameters = list(parameters)
    self.optimization_step += 1
    decay = self.get_decay(self.optimization_step)
    self.cur_decay_value = decay
    one_minus_decay = 1 - decay
    for s_param, param in zip(self.shadow_params, parameters):
      s_param -= one_minus_decay * (s_param - param)


class DiffusersTrainLoopRef:

  def __init__(self, model: _Model, **kwargs: Any):
    self.model = model
    self.ema_unet = DiffusersEMAModelRef(model.params, **kwargs)

  def train_step(self, optimizer_step: Callable[[], None]) -> None:
    optimizer_step()
    self.ema_unet.step(self.model.params)

  @property
  def ema(self) -> list[np.ndarray]:
    return self.ema_unet.shadow_params


# ---------------------------------------------------------------------------
# ema-pytorch: lucidrains/ema-pytorch ema_pytorch/ema_pytorch.py, EMA, as in
# the ema-pytorch 0.8.3 wheel (`update()`: first call copies and returns;
# then `step % update_every`, with `step` read before the increment and
# `get_current_decay` reading the buffer after it; `update_moving_average`
# returns at once when `is_frozen = beta == 1.`). Called once per optimizer
# step: `ema.update()`.


class EmaPytorchEMARef:

  def __init__(
      self,
      model: _Model,
      beta: float = 0.9999,
      update_after_step: int = 100,
      update_every: int = 10,
      inv_gamma: float = 1.0,
      power: float = 2 / 3,
      min_value: float = 0.0,
  ):
    self.model = model
    self.ema_model = copy.deepcopy(model)
    self.beta = beta
    self.update_after_step = update_after_step
    self.update_every = update_every
    self.inv_gamma = inv_gamma
    self.power = power
    self.min_value = min_value
    self.is_frozen = beta == 1.0
    self.initted = False
    self.step = 0

  def copy_params_from_model_to_ema(self) -> None:
    for ma, cur in zip(self.ema_model.params, self.model.params):
      ma[...] = cur

  def get_current_decay(self) -> float:
    epoch = max(self.step - self.update_after_step - 1, 0.0)
    value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
    if epoch <= 0:
      return 0.0
    return min(max(value, self.min_value), self.beta)  # torch.clamp order

  def update(self) -> None:
    step = self.step
    self.step += 1
    if not self.initted:
      self.copy_params_from_model_to_ema()
      self.initted = True
      return
    should_update = step % self.update_every == 0
    if should_update and step <= self.update_after_step:
      self.copy_params_from_model_to_ema()
      return
    if should_update:
      self.update_moving_average(self.ema_model, self.model)

  def update_moving_average(self, ma_model: _Model, current_model: _Model):
    if self.is_frozen:
      return
    current_decay = self.get_current_decay()
    for tgt, src in zip(ma_model.params, current_model.params):
      _lerp_(tgt, src, 1.0 - current_decay)


class EmaPytorchTrainLoopRef:

  ref_cls: type = EmaPytorchEMARef

  def __init__(self, model: _Model, **kwargs: Any):
    self.model = model
    self.ema_obj = self.ref_cls(model, **kwargs)

  def train_step(self, optimizer_step: Callable[[], None]) -> None:
    optimizer_step()
    self.ema_obj.update()

  @property
  def ema(self) -> list[np.ndarray]:
    return self.ema_obj.ema_model.params


# ---------------------------------------------------------------------------
# TensorFlow Addons: tensorflow_addons/optimizers/moving_average.py (fea341f8)
# and average_wrapper.py (e4583906). Slots are created at the first
# `apply_gradients` from the variables' values then; the decay is computed in
# `_prepare_local` from `iterations` before `_distributed_apply` increments it;
# each variable runs the inner optimizer's train op, then the average op
# (`moving_average_update`: `x.assign_sub((x - value) * (1 - momentum))`).


class TfaMovingAverageRef:

  def __init__(
      self,
      optimizer: Any,
      average_decay: float = 0.99,
      num_updates: int | None = None,
      start_step: int = 0,
      dynamic_decay: bool = False,
  ):
    self._optimizer = optimizer
    self._num_updates = num_updates
    if self._num_updates is not None:
      num_updates = float(self._num_updates)
      average_decay = min(average_decay, (1.0 + num_updates) / (10.0 + num_updates))
    self._average_decay = average_decay
    self._start_step = start_step
    self._dynamic_decay = dynamic_decay
    self.iterations = 0
    self._slots: list[np.ndarray] | None = None

  def _get_decay(self, step: int) -> float:
    average_decay = self._average_decay
    step = float(step)
    if step < self._start_step:
      return 0.0
    elif self._dynamic_decay:
      step_count = step - self._start_step
      return min(average_decay, (1.0 + step_count) / (10.0 + step_count))
    else:
      return average_decay

  def _create_slots(self, var_list: list[np.ndarray]) -> None:
    self._slots = [var.copy() for var in var_list]

  def apply_gradients(self, grads_and_vars: list[tuple[Any, np.ndarray]]):
    var_list = [v for _, v in grads_and_vars]
    if self._slots is None:
      self._create_slots(var_list)
    decay = self._get_decay(self.iterations)  # _prepare_local
    for i, (grad, var) in enumerate(grads_and_vars):
      self._optimizer._resource_apply_dense(grad, var, i)  # train_op
      average_var = self._slots[i]
      average_var -= (average_var - var) * (1 - decay)  # average_op
    self.iterations += 1

  @property
  def ema(self) -> list[np.ndarray]:
    return self._slots


class _ReplayOptimizer:
  """The inner optimizer's train op: sets each variable to its next value.

  The values come from the float32 trajectory that `optax.sgd` produced, so
  both sides average exactly the same numbers.
  """

  def __init__(self):
    self.next_values: list[np.ndarray] = []

  def _resource_apply_dense(self, grad: Any, var: np.ndarray, index: int):
    del grad
    var[...] = self.next_values[index]


class TfaTrainLoopRef:

  def __init__(self, model: _Model, **kwargs: Any):
    self.model = model
    self.inner = _ReplayOptimizer()
    self.opt = TfaMovingAverageRef(self.inner, **kwargs)

  def train_step(self, next_values: list[np.ndarray]) -> None:
    self.inner.next_values = next_values
    self.opt.apply_gradients([(None, v) for v in self.model.params])

  @property
  def ema(self) -> list[np.ndarray]:
    return self.opt.ema


class SgdRef:
  """Keras-2 SGD without momentum: `var -= lr * grad`."""

  def __init__(self, learning_rate: float):
    self.learning_rate = learning_rate

  def _resource_apply_dense(self, grad: np.ndarray, var: np.ndarray, index):
    del index
    var -= self.learning_rate * grad


# ---------------------------------------------------------------------------
# Keras 3: keras/src/optimizers/base_optimizer.py and the JAX backend's
# keras/src/backend/jax/optimizer.py. Averages are zeros at `build`; after the
# optimizer's own update, `momentum = (iterations != 0) * ema_momentum`,
# `average = momentum * average + (1 - momentum) * var`; then, when
# `(iterations + 1) % ema_overwrite_frequency == 0`, `var = average`; then
# `iterations += 1`.


class KerasOptimizerEmaRef:

  def __init__(
      self,
      update_step: Callable[[list[np.ndarray]], None],
      ema_momentum: float = 0.99,
      ema_overwrite_frequency: int | None = None,
  ):
    self._backend_update_step = update_step
    self.ema_momentum = ema_momentum
    self.ema_overwrite_frequency = ema_overwrite_frequency
    self.iterations = 0
    self.built = False

  def build(self, variables: list[np.ndarray]) -> None:
    self._model_variables_moving_average = [np.zeros_like(v) for v in variables]
    self.built = True

  def apply(self, trainable_variables: list[np.ndarray]) -> None:
    if not self.built:
      self.build(trainable_variables)
    self._backend_update_step(trainable_variables)
    self._update_model_variables_moving_average(trainable_variables)
    if self.ema_overwrite_frequency is not None:
      if (self.iterations + 1) % self.ema_overwrite_frequency == 0:
        for var, average in zip(
            trainable_variables, self._model_variables_moving_average
        ):
          var[...] = average
    self.iterations += 1

  def _update_model_variables_moving_average(self, trainable_variables):
    for var, average in zip(
        trainable_variables, self._model_variables_moving_average
    ):
      not_first_step = self.iterations != 0
      momentum = float(not_first_step) * self.ema_momentum
      average[...] = momentum * average + (1 - momentum) * var


class KerasTrainLoopRef:

  def __init__(self, model: _Model, **kwargs: Any):
    self.model = model
    self.next_values: list[np.ndarray] = []

    def update_step(variables: list[np.ndarray]) -> None:
      for var, value in zip(variables, self.next_values):
        var[...] = value

    self.optimizer = KerasOptimizerEmaRef(update_step, **kwargs)

  def train_step(self, next_values: list[np.ndarray]) -> None:
    self.next_values = next_values
    self.optimizer.apply(self.model.params)

  @property
  def ema(self) -> list[np.ndarray]:
    return self.optimizer._model_variables_moving_average


# ---------------------------------------------------------------------------
# TensorFlow 2: tensorflow/python/training/moving_averages.py,
# `ExponentialMovingAverage` and `_zero_debias` (unchanged in substance from
# TF 2.0 to 2.21), wired as TF2 training loops do:
# `ema = ExponentialMovingAverage(decay, num_updates=optimizer.iterations)`
# and `ema.apply(vars)` after `optimizer.apply_gradients`, which has already
# incremented `iterations`. A variable's shadow is created at the first
# `apply()` from the variable's value then; a tensor's is zeros, and with
# `zero_debias=True` it reads `biased / (1 - decay ** local_step)`, with the
# decay of the current step.


class TfExponentialMovingAverageRef:

  def __init__(self, decay: float, zero_debias: bool = False, tensors: bool = False):
    self._decay = decay
    self._zero_debias = zero_debias
    self._tensors = tensors
    self._averages: list[np.ndarray] | None = None

  def apply(self, var_list: list[np.ndarray], num_updates: int) -> None:
    if self._averages is None:
      if self._tensors:  # create_zeros_slot
        self._averages = [np.zeros_like(v) for v in var_list]
        self._biased = [np.zeros_like(v) for v in var_list]
        self._local_step = 0
      else:  # create_slot(var, var.read_value())
        self._averages = [v.copy() for v in var_list]
    decay = min(self._decay, (1.0 + num_updates) / (10.0 + num_updates))
    one_minus_decay = 1.0 - decay  # assign_moving_average
    if self._tensors and self._zero_debias:
      self._local_step += 1
      for avg, biased, value in zip(self._averages, self._biased, var_list):
        biased -= (biased - value) * one_minus_decay
        avg[...] = biased / (1 - (1.0 - one_minus_decay) ** self._local_step)
    else:
      for avg, value in zip(self._averages, var_list):
        avg -= (avg - value) * one_minus_decay


class TfTrainLoopRef:

  def __init__(self, model: _Model, **kwargs: Any):
    self.model = model
    self.ema_obj = TfExponentialMovingAverageRef(**kwargs)
    self.iterations = 0

  def train_step(self, next_values: list[np.ndarray]) -> None:
    for var, value in zip(self.model.params, next_values):  # apply_gradients
      var[...] = value
    self.iterations += 1
    self.ema_obj.apply(self.model.params, num_updates=self.iterations)

  @property
  def ema(self) -> list[np.ndarray]:
    return self.ema_obj._averages


# ---------------------------------------------------------------------------
# ema-pytorch's KarrasEMA: ema_pytorch/post_hoc_ema.py in the ema-pytorch
# 0.8.3 wheel. `update()` reads `step`, increments the buffer, returns unless
# `step % update_every == 0`, copies on its first acting call, then lerps with
# `beta = (1 - 1 / (buffer + 1)) ** (1 + gamma)`, the buffer read after the
# increment.


class KarrasEMARef:

  def __init__(self, model: _Model, gamma: float, update_every: int = 100):
    self.model = model
    self.ema_model = copy.deepcopy(model)
    self.gamma = gamma
    self.update_every = update_every
    self.initted = False
    self.step = 0

  @property
  def beta(self) -> float:
    return (1.0 - 1.0 / (self.step + 1.0)) ** (1.0 + self.gamma)

  def update(self) -> None:
    step = self.step
    self.step += 1
    if step % self.update_every != 0:
      return
    if not self.initted:
      for ma, cur in zip(self.ema_model.params, self.model.params):
        ma[...] = cur
      self.initted = True
    current_decay = self.beta
    for tgt, src in zip(self.ema_model.params, self.model.params):
      _lerp_(tgt, src, 1.0 - current_decay)


class KarrasEMATrainLoopRef(EmaPytorchTrainLoopRef):
  """Called as ema-pytorch's `EMA` is: `update()` after each optimizer step."""

  ref_cls = KarrasEMARef


# ---------------------------------------------------------------------------
# The driver.


def _init_params(rng: np.random.Generator) -> dict[str, Any]:
  def normal(*shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)

  return {
      "dense": {"kernel": normal(3, 4), "bias": normal(4)},
      "conv": [normal(2, 3, 2), normal(5) + 3.0],
      "scale": normal(),
  }


def _callback_loop(loop: Any) -> Callable[[list[np.ndarray]], None]:
  """Adapts a loop whose optimizer step is a callback to the replay form."""

  def train_step(next_values: list[np.ndarray]) -> None:
    def optimizer_step() -> None:
      for var, value in zip(loop.model.params, next_values):
        var[...] = value

    loop.train_step(optimizer_step)

  return train_step


def _make_loop(cls: type, model: _Model, kwargs: dict[str, Any]):
  loop = cls(model, **kwargs)
  if cls in (
      TimmTrainLoopRef, DiffusersTrainLoopRef, EmaPytorchTrainLoopRef,
      KarrasEMATrainLoopRef,
  ):
    return loop, _callback_loop(loop)
  return loop, loop.train_step


def _run_parity(
    preset: optax.GradientTransformation,
    loop_cls: type,
    ref_kwargs: dict[str, Any],
    steps: int,
    seed: int = 0,
    *,
    start: Callable[[Any], Any] | None = None,
    read: Callable[[Any, int], Any] = lambda state, t: ema_jax.ema_params(state),
) -> None:
  """`start(params)`, if given, is where the average starts (`ema_jax.reset`);
  `read(state, t)` is what is compared with the reference's average after
  update `t`."""
  rng = np.random.default_rng(seed)
  params = _init_params(rng)
  leaves, treedef = jax.tree.flatten(params)
  model = _Model(leaves)
  loop, train_step = _make_loop(loop_cls, model, ref_kwargs)

  tx = optax.chain(optax.sgd(LR), preset)
  jparams = jax.tree.map(jnp.asarray, params)
  state = tx.init(jparams)
  if start is not None:
    state = ema_jax.reset(state, start(jparams))

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p_leaves = leaves
  for t in range(1, steps + 1):
    g_leaves = [rng.normal(size=x.shape).astype(np.float32) for x in leaves]
    # The SGD step as float32 arithmetic, the same as optax's on these values.
    next_values = [
        (p + np.float32(-LR) * g).astype(np.float64)
        for p, g in zip(p_leaves, g_leaves)
    ]
    train_step(next_values)
    jparams, state = step(jparams, state, treedef.unflatten(g_leaves))

    p_leaves = [np.asarray(x) for x in jax.tree.leaves(jparams)]
    e_leaves = [np.asarray(x) for x in jax.tree.leaves(read(state, t))]
    for i, (p, e, p_ref, e_ref) in enumerate(
        zip(p_leaves, e_leaves, model.params, loop.ema)
    ):
      np.testing.assert_allclose(
          e, e_ref, rtol=RTOL, atol=ATOL, err_msg=f"EMA, step {t}, leaf {i}"
      )
      np.testing.assert_allclose(
          p, p_ref, rtol=RTOL, atol=ATOL, err_msg=f"params, step {t}, leaf {i}"
      )


# ---------------------------------------------------------------------------
# Trajectory parity, one test per preset, over its arguments.


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(ema_momentum=0.99),
        dict(ema_momentum=0.9),
        dict(ema_momentum=0.5, ema_overwrite_frequency=1),
        dict(ema_momentum=0.9, ema_overwrite_frequency=3),
        dict(ema_momentum=0.99, ema_overwrite_frequency=7),
        dict(ema_momentum=0.0, ema_overwrite_frequency=10),
    ],
    ids=str,
)
def test_keras_matches_reference(kwargs):
  _run_parity(presets.keras(**kwargs), KerasTrainLoopRef, kwargs, steps=60)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(average_decay=0.9),
        dict(average_decay=0.9, start_step=3),
        dict(average_decay=0.99, start_step=7),
        dict(average_decay=0.99, dynamic_decay=True),
        dict(average_decay=0.9, dynamic_decay=True, start_step=3),
        dict(average_decay=0.99, num_updates=5),
        dict(average_decay=0.5, num_updates=0),
        dict(average_decay=0.99, num_updates=50, dynamic_decay=True, start_step=7),
    ],
    ids=str,
)
def test_tfa_matches_reference(kwargs):
  _run_parity(presets.tfa(**kwargs), TfaTrainLoopRef, kwargs, steps=60)


_TIMM_CASES = [
    dict(),
    dict(decay=0.9),
    dict(decay=0.9, update_after_step=3),
    dict(decay=0.99, update_after_step=7),
    dict(decay=0.999, use_warmup=True),
    dict(decay=0.95, use_warmup=True, update_after_step=3),
    dict(decay=0.99, use_warmup=True, min_decay=0.5, update_after_step=7),
    dict(decay=0.9999, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75),
    # timm applies `min_decay` on the warm-up branch only.
    dict(decay=0.9, min_decay=0.95),
    # `max(min(warm-up, decay), min_decay)`: a `min_decay` above `decay` wins.
    dict(decay=0.9, use_warmup=True, min_decay=0.95),
    dict(decay=0.5, use_warmup=True, min_decay=0.7, update_after_step=3),
]


@pytest.mark.parametrize("kwargs", _TIMM_CASES, ids=str)
def test_timm_matches_reference(kwargs):
  _run_parity(presets.timm(**kwargs), TimmTrainLoopRef, kwargs, steps=60)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(decay=0.9),
        dict(decay=0.99, update_after_step=3),
        dict(decay=0.999, update_after_step=7),
        dict(decay=0.9999, use_ema_warmup=True),
        dict(decay=0.95, use_ema_warmup=True, update_after_step=3),
        dict(decay=0.99, use_ema_warmup=True, min_decay=0.5, update_after_step=7),
        dict(decay=0.9999, use_ema_warmup=True, inv_gamma=2.0, power=0.75),
        # Without warm-up, diffusers still floors at `min_decay`.
        dict(decay=0.99, min_decay=0.6),
        # `max(min(value, decay), min_decay)`: a `min_decay` above `decay` wins.
        dict(decay=0.5, min_decay=0.8),
        dict(decay=0.9, use_ema_warmup=True, min_decay=0.95),
        dict(decay=0.5, use_ema_warmup=True, min_decay=0.7, update_after_step=3),
    ],
    ids=str,
)
def test_diffusers_matches_reference(kwargs):
  _run_parity(presets.diffusers(**kwargs), DiffusersTrainLoopRef, kwargs, steps=60)


@pytest.mark.parametrize(
    "kwargs, steps",
    [
        (dict(), 135),  # the defaults: copies until 100, first lerp at call 110
        (dict(update_after_step=0, update_every=1), 60),
        (dict(update_after_step=3, update_every=1), 60),
        (dict(update_after_step=7, update_every=3), 60),
        (dict(update_after_step=0, update_every=3, beta=0.9), 60),
        (dict(update_after_step=7, update_every=10), 60),
        (dict(update_after_step=20, update_every=10, min_value=0.5), 60),
        (dict(update_after_step=2, update_every=1, inv_gamma=3.0, power=0.75), 60),
        (dict(update_after_step=4, update_every=3, beta=0.6, min_value=0.3), 60),
        # `beta == 1` freezes the average between its copies (`is_frozen`).
        (dict(beta=1.0), 135),
        (dict(beta=1.0, update_after_step=5, update_every=2), 60),
        # `torch.clamp(min=min_value, max=beta)` with `min_value > beta` is `beta`.
        (dict(update_after_step=3, update_every=1, beta=0.6, min_value=0.9), 60),
        (dict(update_after_step=0, update_every=2, beta=0.0, min_value=0.5), 60),
    ],
    ids=str,
)
def test_ema_pytorch_matches_reference(kwargs, steps):
  _run_parity(presets.ema_pytorch(**kwargs), EmaPytorchTrainLoopRef, kwargs, steps)


def test_references_agree_where_the_libraries_do():
  # A cross-check of two references written independently: timm without
  # warm-up (copy at step 1, then a constant decay) and Keras (momentum 0 at
  # step 1, then constant) describe the same average.
  rng = np.random.default_rng(3)
  p0 = [rng.normal(size=(4,))]
  timm_loop, timm_step = _make_loop(TimmTrainLoopRef, _Model(p0), dict(decay=0.8))
  keras_loop, keras_step = _make_loop(
      KerasTrainLoopRef, _Model(p0), dict(ema_momentum=0.8)
  )
  for _ in range(10):
    values = [rng.normal(size=(4,))]
    timm_step([v.copy() for v in values])
    keras_step([v.copy() for v in values])
    np.testing.assert_allclose(timm_loop.ema[0], keras_loop.ema[0], rtol=1e-12)


# ---------------------------------------------------------------------------
# First steps by hand: p_0 = 5, sgd(1.0) with gradient -1, so p_t = 5 + t.


def _first_emas(preset: optax.GradientTransformation, steps: int) -> list[float]:
  tx = optax.chain(optax.sgd(1.0), preset)
  params = jnp.array([5.0])
  state = tx.init(params)
  out = []
  for _ in range(steps):
    updates, state = tx.update(jnp.array([-1.0]), state, params)
    params = optax.apply_updates(params, updates)
    out.append(float(ema_jax.ema_params(state)[0]))
  return out


def test_keras_first_steps_by_hand():
  # Step 1: momentum 0 (iterations == 0) copies p_1 = 6; the zero
  # initialisation and p_0 never enter. Step 2: 0.5 * 6 + 0.5 * 7.
  np.testing.assert_allclose(_first_emas(presets.keras(0.5), 3), [6.0, 6.5, 7.25])


def test_keras_overwrite_by_hand():
  tx = optax.chain(optax.sgd(1.0), presets.keras(0.5, ema_overwrite_frequency=2))
  params = jnp.array([5.0])
  state = tx.init(params)
  seen = []
  for _ in range(4):
    updates, state = tx.update(jnp.array([-1.0]), state, params)
    params = optax.apply_updates(params, updates)
    seen.append((float(params[0]), float(ema_jax.ema_params(state)[0])))
  # t=1: p 6, e 6. t=2: p 7, e 6.5, overwrite p <- 6.5. t=3: p 7.5,
  # e 7.0. t=4: p 8.5, e 7.75, overwrite p <- 7.75.
  np.testing.assert_allclose(
      seen, [(6.0, 6.0), (6.5, 6.5), (7.5, 7.0), (7.75, 7.75)]
  )


def test_tfa_first_steps_by_hand():
  # The average starts at p_0 = 5 and nothing is copied: e_1 = 0.5*5 + 0.5*6.
  np.testing.assert_allclose(_first_emas(presets.tfa(0.5), 2), [5.5, 6.25])
  # start_step=1: update k=0 copies.
  np.testing.assert_allclose(
      _first_emas(presets.tfa(0.5, start_step=1), 2), [6.0, 6.5]
  )
  # dynamic: decay min(0.99, 1/10) at k=0, 2/11 at k=1.
  e1 = 0.1 * 5 + 0.9 * 6
  e2 = 2 / 11 * e1 + 9 / 11 * 7
  np.testing.assert_allclose(
      _first_emas(presets.tfa(0.99, dynamic_decay=True), 2), [e1, e2], rtol=1e-6
  )
  # num_updates=0 caps the decay at 1/10 for good, not only at the start.
  e = [5.0]
  for t in range(1, 4):
    e.append(0.1 * e[-1] + 0.9 * (5 + t))
  np.testing.assert_allclose(
      _first_emas(presets.tfa(0.99, num_updates=0), 3), e[1:], rtol=1e-6
  )


def test_timm_first_steps_by_hand():
  # step=1: s = max(0, 1 - 0 - 1) = 0 -> decay 0, a copy.
  np.testing.assert_allclose(_first_emas(presets.timm(0.5), 3), [6.0, 6.5, 7.25])
  # update_after_step=2: steps 1..3 copy, step 4 has s = 1.
  np.testing.assert_allclose(
      _first_emas(presets.timm(0.5, update_after_step=2), 4), [6.0, 7.0, 8.0, 8.5]
  )
  # Warm-up: s = 1 gives 1 - 2 ** (-2/3).
  d = 1 - 2 ** (-2 / 3)
  np.testing.assert_allclose(
      _first_emas(presets.timm(0.9999, use_warmup=True), 2),
      [6.0, d * 6 + (1 - d) * 7],
      rtol=1e-6,
  )


def test_diffusers_first_steps_by_hand():
  # optimization_step=1 copies; then (1 + s) / (10 + s) with s = 1, 2.
  e2 = 2 / 11 * 6 + 9 / 11 * 7
  e3 = 3 / 12 * e2 + 9 / 12 * 8
  np.testing.assert_allclose(
      _first_emas(presets.diffusers(), 3), [6.0, e2, e3], rtol=1e-6
  )
  # update_after_step=1: optimization_steps 1 and 2 copy.
  np.testing.assert_allclose(
      _first_emas(presets.diffusers(0.9999, update_after_step=1), 3),
      [6.0, 7.0, 2 / 11 * 7 + 9 / 11 * 8],
      rtol=1e-6,
  )
  # min_decay floors the ramp but never stops the copy (get_decay returns
  # 0.0 before the clamp).
  np.testing.assert_allclose(
      _first_emas(presets.diffusers(0.9999, min_decay=0.5), 2),
      [6.0, 0.5 * 6 + 0.5 * 7],
      rtol=1e-6,
  )


def test_ema_pytorch_first_steps_by_hand():
  # Call k=0 copies p_1 = 6; k=1 is skipped (1 % 2 != 0); k=2 lerps toward
  # p_3 = 8 with epoch = step_buffer - 0 - 1 = 2.
  d = 1 - 3 ** (-2 / 3)
  np.testing.assert_allclose(
      _first_emas(presets.ema_pytorch(update_after_step=0, update_every=2), 3),
      [6.0, 6.0, d * 6 + (1 - d) * 8],
      rtol=1e-6,
  )
  # The first call copies even when it is not due and update_after_step is 0.
  np.testing.assert_allclose(
      _first_emas(presets.ema_pytorch(update_after_step=0, update_every=5), 2),
      [6.0, 6.0],
  )
  # Defaults (update_after_step=100, update_every=10): copies at calls 0, 10,
  # ..., 100; the first lerp is at call 110, with epoch 10.
  emas = _first_emas(presets.ema_pytorch(), 111)
  assert emas[0] == 6.0 and emas[9] == 6.0 and emas[10] == 16.0
  assert emas[100] == 106.0 and emas[109] == 106.0
  d = 1 - 11 ** (-2 / 3)
  np.testing.assert_allclose(emas[110], d * 106 + (1 - d) * 116, rtol=1e-6)


# ---------------------------------------------------------------------------
# TensorFlow Addons' own unit tests (tests/moving_average_test.py at 3adb3250),
# through `presets.tfa` and `ema_jax.moving_average`.


def _tfa_forms(**kwargs: Any) -> list[optax.GradientTransformation]:
  lr = kwargs.pop("lr")
  return [
      optax.chain(optax.sgd(lr), presets.tfa(**kwargs)),
      ema_jax.moving_average(optax.sgd(lr), **kwargs),
  ]


def _run_tfa_test(tx, params, grads, steps):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, ema_jax.ema_params(state)


@pytest.mark.parametrize("form", [0, 1], ids=["presets.tfa", "moving_average"])
def test_tfa_unit_test_run(form):
  tx = _tfa_forms(lr=2.0, average_decay=0.5)[form]
  params = [jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])]
  grads = [jnp.array([0.1, 0.1]), jnp.array([0.01, 0.01])]
  params, ema = _run_tfa_test(tx, params, grads, 2)
  np.testing.assert_allclose(params[0], [0.6, 1.6], rtol=1e-6)
  np.testing.assert_allclose(params[1], [2.96, 3.96], rtol=1e-6)
  np.testing.assert_allclose(ema[0], [0.75, 1.75], rtol=1e-6)
  np.testing.assert_allclose(ema[1], [2.975, 3.975], rtol=1e-6)


@pytest.mark.parametrize("form", [0, 1], ids=["presets.tfa", "moving_average"])
def test_tfa_unit_test_model_weights_update(form):
  tx = _tfa_forms(lr=2.0, average_decay=0.5)[form]
  params, ema = _run_tfa_test(tx, jnp.array([[1.0]]), jnp.array([[0.1]]), 1)
  np.testing.assert_allclose(params, [[0.8]], rtol=1e-6)
  np.testing.assert_allclose(ema, [[0.9]], rtol=1e-6)


@pytest.mark.parametrize("form", [0, 1], ids=["presets.tfa", "moving_average"])
def test_tfa_unit_test_start_step(form):
  tx = _tfa_forms(lr=1.0, average_decay=0.5, start_step=1)[form]
  params, ema = _run_tfa_test(tx, jnp.array([1.0, 2.0]), jnp.array([0.1, 0.1]), 1)
  np.testing.assert_allclose(params, [0.9, 1.9], rtol=1e-6)
  np.testing.assert_allclose(ema, [0.9, 1.9], rtol=1e-6)
  params, ema = _run_tfa_test(tx, jnp.array([1.0, 2.0]), jnp.array([0.1, 0.1]), 2)
  np.testing.assert_allclose(params, [0.8, 1.8], rtol=1e-6)
  np.testing.assert_allclose(ema, [0.85, 1.85], rtol=1e-6)


@pytest.mark.parametrize("form", [0, 1], ids=["presets.tfa", "moving_average"])
def test_tfa_unit_test_dynamic_decay(form):
  tx = _tfa_forms(lr=2.0, average_decay=0.5, dynamic_decay=True)[form]
  params, ema = _run_tfa_test(tx, jnp.array([1.0, 2.0]), jnp.array([0.1, 0.1]), 2)
  np.testing.assert_allclose(params, [0.6, 1.6], rtol=1e-6)
  np.testing.assert_allclose(ema, [0.64, 1.64], rtol=1e-6)


def test_tfa_reference_reproduces_tfa_unit_tests():
  # The float64 reference itself passes TFA's tests, with a real SGD inside.
  var0, var1 = np.array([1.0, 2.0]), np.array([3.0, 4.0])
  opt = TfaMovingAverageRef(SgdRef(2.0), average_decay=0.5)
  for _ in range(2):
    opt.apply_gradients([(np.array([0.1, 0.1]), var0), (np.array([0.01, 0.01]), var1)])
  np.testing.assert_allclose(var0, [0.6, 1.6])
  np.testing.assert_allclose(var1, [2.96, 3.96])
  np.testing.assert_allclose(opt.ema[0], [0.75, 1.75])
  np.testing.assert_allclose(opt.ema[1], [2.975, 3.975])

  var0 = np.array([1.0, 2.0])
  opt = TfaMovingAverageRef(SgdRef(1.0), average_decay=0.5, start_step=1)
  for _ in range(2):
    opt.apply_gradients([(np.array([0.1, 0.1]), var0)])
  np.testing.assert_allclose(var0, [0.8, 1.8])
  np.testing.assert_allclose(opt.ema[0], [0.85, 1.85])

  var0 = np.array([1.0, 2.0])
  opt = TfaMovingAverageRef(SgdRef(2.0), average_decay=0.5, dynamic_decay=True)
  for _ in range(2):
    opt.apply_gradients([(np.array([0.1, 0.1]), var0)])
  np.testing.assert_allclose(var0, [0.6, 1.6])
  np.testing.assert_allclose(opt.ema[0], [0.64, 1.64])


def test_ema_pytorch_reference_decay_formula():
  # get_current_decay reads the incremented buffer: at call k (0-based) with
  # update_after_step U, epoch = k - U.
  ref = EmaPytorchEMARef(_Model([np.zeros(1)]), update_after_step=3, beta=0.99)
  ref.step = 8  # the buffer after the increment of call k = 7
  assert math.isclose(ref.get_current_decay(), 1 - (1 + 4) ** (-2 / 3))


# ---------------------------------------------------------------------------
# The edges: messages in each library's own parameter names.

# ema_jax's names for arguments the library names otherwise.
_FOREIGN = {
    "keras": ("decay",),
    "tfa": ("decay",),
    "timm": ("inv_gamma", "power"),
    "diffusers": (),
    "ema_pytorch": ("decay", "min_decay"),
}


@pytest.mark.parametrize(
    "preset, args, kwargs, name",
    [
        ("keras", (1.5,), {}, "ema_momentum"),
        ("keras", (0.9,), dict(ema_overwrite_frequency=0), "ema_overwrite_frequency"),
        ("tfa", (1.5,), {}, "average_decay"),
        ("tfa", (-0.1,), dict(dynamic_decay=True), "average_decay"),
        ("tfa", (1.5,), dict(num_updates=3), "average_decay"),
        ("tfa", (0.9,), dict(num_updates=-1), "num_updates"),
        ("tfa", (0.9,), dict(start_step=-1), "start_step"),
        ("timm", (1.5,), {}, "decay"),
        ("timm", (1.5,), dict(use_warmup=True), "decay"),
        ("timm", (0.9,), dict(min_decay=1.5, use_warmup=True), "min_decay"),
        ("timm", (0.9,), dict(min_decay=-1.0), "min_decay"),
        ("timm", (0.9,), dict(use_warmup=True, warmup_gamma=0.0), "warmup_gamma"),
        ("timm", (0.9,), dict(use_warmup=True, warmup_power=-1.0), "warmup_power"),
        ("timm", (0.9,), dict(update_after_step=-1), "update_after_step"),
        ("diffusers", (1.5,), {}, "decay"),
        ("diffusers", (1.5,), dict(use_ema_warmup=True), "decay"),
        ("diffusers", (0.9,), dict(min_decay=2.0), "min_decay"),
        ("diffusers", (0.9,), dict(use_ema_warmup=True, inv_gamma=0.0), "inv_gamma"),
        ("diffusers", (0.9,), dict(use_ema_warmup=True, power=0.0), "power"),
        ("diffusers", (0.9,), dict(update_after_step=-2), "update_after_step"),
        ("ema_pytorch", (1.5,), {}, "beta"),
        ("ema_pytorch", (-0.5,), {}, "beta"),
        ("ema_pytorch", (0.9,), dict(min_value=1.5), "min_value"),
        ("ema_pytorch", (0.9,), dict(inv_gamma=0.0), "inv_gamma"),
        ("ema_pytorch", (0.9,), dict(power=-2.0), "power"),
        ("ema_pytorch", (0.9,), dict(update_after_step=-1), "update_after_step"),
        ("ema_pytorch", (0.9,), dict(update_every=0), "update_every"),
    ],
    ids=str,
)
def test_preset_messages_use_the_library_names(preset, args, kwargs, name):
  with pytest.raises(ValueError) as info:
    getattr(presets, preset)(*args, **kwargs)
  message = str(info.value)
  assert f"`{name}`" in message, message
  for other in _FOREIGN[preset]:
    assert f"`{other}`" not in message, message


def test_edges_by_hand():
  # timm with warm-up and min_decay > decay: step 1 copies 6, then 0.9 throughout.
  np.testing.assert_allclose(
      _first_emas(presets.timm(0.5, use_warmup=True, min_decay=0.9), 3),
      [6.0, 0.9 * 6 + 0.1 * 7, 0.9 * (0.9 * 6 + 0.1 * 7) + 0.1 * 8],
      rtol=1e-6,
  )
  # ema-pytorch beta=1: copies at calls 0 and 2 (update_after_step=2,
  # update_every=2), frozen at the copy of p_3 = 8 afterwards.
  np.testing.assert_allclose(
      _first_emas(presets.ema_pytorch(1.0, update_after_step=2, update_every=2), 8),
      [6.0, 6.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0],
  )
  # ema-pytorch min_value > beta: clamp gives beta = 0.5 at every lerp.
  np.testing.assert_allclose(
      _first_emas(presets.ema_pytorch(0.5, update_after_step=0, update_every=1,
                                      min_value=0.8), 3),
      [6.0, 6.5, 7.25],
  )


# ---------------------------------------------------------------------------
# The documented differences: the recipes of docs/migrating.md against the
# references above.


def tf2_recipe(decay: float) -> optax.GradientTransformation:
  # The shadow is the params after update 1; update t reads the ramp at t.
  def ramp(j: Any) -> Any:
    t = jnp.asarray(j, jnp.float32) + 2.0
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))

  return ema_jax.ema(ramp, start_step=1)


def tf_zero_debias_ramp(decay: float) -> Callable[[Any], Any]:
  # The biased accumulator's decay at update t = k + 1: the ramp at t.
  def ramp(k: Any) -> Any:
    t = jnp.asarray(k, jnp.float32) + 1.0
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))

  return ramp


def tf_zero_debias_read(decay: float) -> Callable[[Any, int], Any]:
  def read(state: Any, t: int) -> Any:
    d_t = min(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda b: b / (1 - d_t**t), ema_jax.ema_params(state))

  return read


def karras_ema_recipe(gamma: float, update_every: int) -> optax.GradientTransformation:
  power = ema_jax.power_decay(gamma=gamma)

  def decay(j: Any) -> Any:
    # KarrasEMA's beta on the calls it acts on, 1 (no change) on the others,
    # so the engine's product over `update_every` steps is KarrasEMA's beta.
    return jnp.where((j + 1) % update_every == 0, power(j + 2), 1.0)

  return ema_jax.ema(decay, start_step=1, update_every=update_every)


@pytest.mark.parametrize("decay", [0.99, 0.9, 0.5])
def test_tf2_recipe_matches_tf2_wiring(decay):
  _run_parity(tf2_recipe(decay), TfTrainLoopRef, dict(decay=decay), steps=60)


@pytest.mark.parametrize("decay", [0.99, 0.9])
def test_tf_zero_debias_recipe_matches_tf(decay):
  _run_parity(
      ema_jax.ema(tf_zero_debias_ramp(decay)),
      TfTrainLoopRef,
      dict(decay=decay, zero_debias=True, tensors=True),
      steps=60,
      start=lambda params: jax.tree.map(jnp.zeros_like, params),
      read=tf_zero_debias_read(decay),
  )


def test_tf_zero_debias_equals_debias_for_a_constant_decay_only():
  # A decay below the ramp's first value (2/11) is constant: TF's divisor
  # `1 - d ** t` is then the total weight that `debias` divides by.
  _run_parity(
      ema_jax.ema(0.1, debias=True), TfTrainLoopRef,
      dict(decay=0.1, zero_debias=True, tensors=True), steps=30,
  )
  # With the ramp they differ (docs/migrating.md gives the size).
  with pytest.raises(AssertionError):
    _run_parity(
        ema_jax.ema(tf_zero_debias_ramp(0.99), debias=True), TfTrainLoopRef,
        dict(decay=0.99, zero_debias=True, tensors=True), steps=30,
    )


@pytest.mark.parametrize("update_every", [1, 3, 10])
@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_karras_ema_recipe_matches_ema_pytorch(update_every, sigma_rel):
  gamma = ema_jax.sigma_rel_to_gamma(sigma_rel)
  _run_parity(
      karras_ema_recipe(gamma, update_every),
      KarrasEMATrainLoopRef,
      dict(gamma=gamma, update_every=update_every),
      steps=60,
  )


def test_karras_ema_is_one_step_off_edm2():
  # EDM2's decay at update t is (1 - 1/t) ** (gamma + 1), `power_decay`;
  # KarrasEMA's is (1 - 1/(t + 1)) ** (gamma + 1).
  gamma = ema_jax.sigma_rel_to_gamma(0.05)
  with pytest.raises(AssertionError):
    _run_parity(
        ema_jax.ema(ema_jax.power_decay(gamma=gamma)),
        KarrasEMATrainLoopRef, dict(gamma=gamma, update_every=1), steps=30,
    )
