"""`ema_jax.bema` against independent float64 implementations of TRL's
`BEMACallback` and of the paper's code, and with every helper an EMA state
works with.

The TRL reference follows trl/trainer/callbacks.py (TRL 1.16.0): buffers made
at `on_train_begin`, `on_step_end` with `global_step = t` after optimizer
update `t`. The paper's reference follows abblock/bema src/core_offline.py
(`BEMA.update`) driven as src/run_eval.py drives it, over checkpoints saved
every `update_freq` steps. Both see the float32 params trajectory of the
ema_jax run, in float64.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_jax

LR = 0.1


class TrlBemaRef:
  """trl.trainer.callbacks.BEMACallback, its arithmetic and control flow."""

  def __init__(self, update_freq=400, ema_power=0.5, bias_power=0.2, lag=10,
               update_after=0, multiplier=1.0, min_ema_multiplier=0.0):
    self.update_freq = update_freq
    self.ema_power = ema_power
    self.bias_power = bias_power
    self.lag = lag
    self.update_after = update_after
    self.multiplier = multiplier
    self.min_ema_multiplier = min_ema_multiplier
    self.calls: list[int] = []

  def on_train_begin(self, params: list[np.ndarray]) -> None:
    self.running = [p.copy() for p in params]  # running_model.load_state_dict
    self.theta0 = [p.copy() for p in params]
    self.ema = [p.copy() for p in params]

  def _ema_beta(self, step: int) -> float:
    beta = (self.lag + self.multiplier * step) ** (-self.ema_power)
    return max(beta, self.min_ema_multiplier)

  def _bema_alpha(self, step: int) -> float:
    return (self.lag + self.multiplier * step) ** (-self.bias_power)

  def _update_bema_weights(self, step: int, params: list[np.ndarray]) -> None:
    self.calls.append(step)
    beta = self._ema_beta(step)
    alpha = self._bema_alpha(step)
    for thetat, theta0, ema, run in zip(params, self.theta0, self.ema, self.running):
      ema[...] = ema * (1 - beta) + thetat * beta
      run[...] = ema + alpha * (thetat - theta0)

  def on_step_end(self, step: int, params: list[np.ndarray]) -> None:
    if step < self.update_after:
      return
    if step == self.update_after:
      for thetat, theta0, ema in zip(params, self.theta0, self.ema):
        theta0[...] = thetat
        ema[...] = thetat
    elif (step - self.update_after) % self.update_freq == 0:
      self._update_bema_weights(step, params)


class PaperBemaRef:
  """abblock/bema's `BEMA` (core_offline.py), driven as run_eval.py does."""

  def __init__(self, params, update_freq, ema_power=0.5, update_after=0,
               eta_power=0.2, ema_gamma=1.0, scaling_lag=0,
               min_ema_multiplier=0.0):
    self.update_freq = update_freq
    self.ema_power = ema_power
    self.ema_gamma = ema_gamma
    self.do_ema = 0 < ema_power < 1
    self.update_after = update_after
    self.ema_update_after = update_after
    self.eta_power = eta_power
    self.do_bema = eta_power >= 0
    self.scaling_lag = scaling_lag
    self.min_ema_multiplier = min_ema_multiplier
    self.initial_weights = [p.copy() for p in params]
    self.initialized = update_after == 0
    self.running = [p.copy() for p in params]
    self.ema_model = [p.copy() for p in params]
    self.previous_ckpt = -update_freq

  def get_ema_time(self, step):
    return max(step - self.ema_update_after + self.scaling_lag, 1)

  def get_stabilizer_time(self, step):
    return max(step - self.update_after + self.scaling_lag, 1)

  def update(self, new_weights, step):
    if step >= min(self.update_after, self.ema_update_after):
      if not self.initialized:
        self.initial_weights = [w.copy() for w in new_weights]
        self.ema_model = [r.copy() for r in self.running]
        self.initialized = True
      if self.do_ema:
        time = self.get_ema_time(step)
        beta = max((1 + self.ema_gamma * time) ** (-self.ema_power),
                   self.min_ema_multiplier)
        for e, w in zip(self.ema_model, new_weights):
          e[...] = e * (1 - beta) + w * beta
      else:
        for e, w in zip(self.ema_model, new_weights):
          e[...] = w
      if self.do_bema:
        mult = (1 + self.get_stabilizer_time(step)) ** -self.eta_power
        for r, w, w0, e in zip(self.running, new_weights, self.initial_weights,
                               self.ema_model):
          r[...] = (w * mult - w0 * mult) + e
      else:
        for r, e in zip(self.running, self.ema_model):
          r[...] = e
    else:
      for r, w in zip(self.running, new_weights):
        r[...] = w

  def on_checkpoint(self, step, params):
    """run_eval.py's loop over checkpoints, one saved every `update_freq`."""
    if step % self.update_freq:
      return
    if step - self.previous_ckpt < self.update_freq:
      return
    self.previous_ckpt = step
    self.update([p.copy() for p in params], step)


def _params(rng: np.random.Generator) -> dict[str, Any]:
  normal = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
  return {"dense": {"kernel": normal(3, 4), "bias": normal(4)},
          "scale": normal(), "layers": [normal(2, 3)]}


def _trajectory(steps: int, seed: int = 0):
  """Initial params and per-step gradients, float32."""
  rng = np.random.default_rng(seed)
  params = _params(rng)
  grads = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), params)
           for _ in range(steps)]
  return params, grads


def _run(tx, params, grads, jit=True):
  """ema_jax's run: (params after each update, state after each update)."""
  step = lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))  # noqa: E731
  if jit:
    step = jax.jit(step)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  out = []
  for g in grads:
    p, state = step(p, state, g)
    out.append((p, state))
  return out


def _leaves64(tree) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _bema_state(state) -> ema_jax.BemaState:
  return state[1]


TRL_CASES = [
    dict(update_freq=1),
    dict(update_freq=2),
    dict(update_freq=3, update_after=4),
    dict(update_freq=1, update_after=2, lag=2),
    dict(update_freq=2, ema_power=0.0),
    dict(update_freq=2, bias_power=0.0),
    dict(update_freq=1, ema_power=0.8, bias_power=0.5, multiplier=3.0, lag=0),
    dict(update_freq=1, min_ema_multiplier=0.3),
    dict(update_freq=400),  # TRL's defaults: nothing moves in 40 steps
    dict(update_freq=5, update_after=7, lag=1, multiplier=0.5),
]


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("kwargs", TRL_CASES, ids=str)
def test_bema_matches_trl(kwargs, jit):
  steps = 40
  params, grads = _trajectory(steps)
  out = _run(optax.chain(optax.sgd(LR), ema_jax.bema(**kwargs)), params, grads, jit)
  ref = TrlBemaRef(**kwargs)
  ref.on_train_begin(_leaves64(params))
  for t, (p, state) in enumerate(out, start=1):
    ref.on_step_end(t, _leaves64(p))
    bema = _bema_state(state)
    assert int(bema.weights.count) == t
    for what, ours, theirs in (
        ("BEMA weights", ema_jax.ema_params(state), ref.running),
        ("EMA", bema.average, ref.ema),
        ("theta_0", bema.origin, ref.theta0),
    ):
      for i, (a, b) in enumerate(zip(_leaves64(ours), theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6,
                                   err_msg=f"{what}, update {t}, leaf {i}")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # TRL's tests/test_callbacks.py: 9 steps.
        (dict(update_freq=2), [2, 4, 6, 8]),
        (dict(update_freq=3), [3, 6, 9]),
        (dict(update_freq=2, update_after=3), [5, 7, 9]),
    ],
)
def test_trl_update_schedule(kwargs, expected):
  params, grads = _trajectory(9, seed=1)
  out = _run(optax.chain(optax.sgd(LR), ema_jax.bema(**kwargs)), params, grads)
  ref = TrlBemaRef(**kwargs)
  ref.on_train_begin(_leaves64(params))
  moved, before = [], _leaves64(params)
  for t, (p, state) in enumerate(out, start=1):
    ref.on_step_end(t, _leaves64(p))
    now = _leaves64(ema_jax.ema_params(state))
    if any(not np.array_equal(a, b) for a, b in zip(now, before)):
      moved.append(t)
    before = now
  assert ref.calls == expected  # the reference is TRL's schedule
  assert moved == expected


@pytest.mark.parametrize("lag", [1, 10])
@pytest.mark.parametrize("update_freq", [1, 4])
def test_paper_code_is_trl_with_one_more_lag(update_freq, lag):
  # abblock/bema with update_after=0 and gamma=1: beta = (1 + step + lag) **
  # -kappa and alpha = (1 + step + lag) ** -eta at steps that are multiples
  # of update_freq: TRL's rule with `lag + 1`.
  steps = 24
  params, grads = _trajectory(steps, seed=2)
  out = _run(optax.chain(optax.sgd(LR), ema_jax.bema(update_freq, lag=lag + 1)),
             params, grads)
  paper = PaperBemaRef(_leaves64(params), update_freq, scaling_lag=lag)
  for t, (p, state) in enumerate(out, start=1):
    paper.on_checkpoint(t, _leaves64(p))
    for a, b in zip(_leaves64(ema_jax.ema_params(state)), paper.running):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=f"step {t}")


def test_paper_code_differs_after_a_burn_in():
  # With update_after > 0 the paper's code shows the raw params until the
  # burn-in and takes theta_0 at the first checkpoint after it; TRL keeps the
  # initial params and takes theta_0 at `update_after` itself.
  steps, update_freq, update_after = 12, 2, 3
  params, grads = _trajectory(steps, seed=3)
  out = _run(optax.chain(optax.sgd(LR), ema_jax.bema(
      update_freq, lag=11, update_after=update_after)), params, grads)
  paper = PaperBemaRef(_leaves64(params), update_freq, update_after=update_after,
                       scaling_lag=10)
  gaps = []
  for t, (p, state) in enumerate(out, start=1):
    paper.on_checkpoint(t, _leaves64(p))
    ours = _leaves64(ema_jax.ema_params(state))
    gaps.append(max(np.abs(a - b).max() for a, b in zip(ours, paper.running)))
  assert max(gaps) > 0.05


def test_first_update_by_hand():
  # t = 1, s = lag + t = 2: EMA = 2 ** -0.5 * 4, weights = EMA + 2 ** -0.2 * 4.
  tx = optax.chain(optax.sgd(1.0), ema_jax.bema(update_freq=1, lag=1))
  params = jnp.array([0.0])
  state = tx.init(params)
  updates, state = tx.update(jnp.array([-4.0]), state, params)
  expected = 2**-0.5 * 4 + 2**-0.2 * 4
  np.testing.assert_allclose(ema_jax.ema_params(state), [expected], rtol=1e-6)


def test_defaults_keep_the_initial_params_for_399_updates():
  params, grads = _trajectory(401, seed=4)
  out = _run(optax.chain(optax.sgd(LR), ema_jax.bema()), params, grads)
  for t in (1, 200, 399):
    for a, b in zip(_leaves64(ema_jax.ema_params(out[t - 1][1])), _leaves64(params)):
      np.testing.assert_array_equal(a, b)
  moved = _leaves64(ema_jax.ema_params(out[399][1]))
  assert any(not np.array_equal(a, b) for a, b in zip(moved, _leaves64(params)))


def test_no_recompile():
  tx = optax.chain(optax.sgd(LR), ema_jax.bema(update_freq=2))
  params, grads = _trajectory(4)
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = jax.tree.map(jnp.asarray, params)
  s = tx.init(p)
  for g in grads:
    p, s = step(p, s, g)
  assert len(traces) == 1


# ---------------------------------------------------------------------------
# Everything an `ema` state works with.


def _trained(tx, steps=6, params=None):
  params = params if params is not None else {"w": jnp.arange(4.0), "b": jnp.ones(2)}
  state = tx.init(params)
  for k in range(steps):
    g = jax.tree.map(lambda x: jnp.full_like(x, -1.0 - k), params)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_swap_is_exact_and_twice_is_identity():
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), ema_jax.bema(update_freq=2, lag=1))
  params, state = _trained(tx)
  bema_weights = ema_jax.ema_params(state)
  swapped_in, swapped = ema_jax.swap(params, state)
  assert ema_jax.is_swapped(swapped)
  for a, b in zip(jax.tree.leaves(swapped_in), jax.tree.leaves(bema_weights)):
    np.testing.assert_array_equal(a, b)
  back, state2 = ema_jax.swap(swapped_in, swapped)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(state2) == jax.tree.structure(state)
  with pytest.raises(ValueError, match="swapped"):
    tx.update(jax.tree.map(jnp.zeros_like, params), swapped, swapped_in)


def test_bema_weights_differ_from_its_ema():
  # ema_params reads the BEMA weights, not the EMA under them.
  tx = optax.chain(optax.sgd(1.0), ema_jax.bema(update_freq=1, lag=1))
  params, state = _trained(tx)
  assert not np.allclose(ema_jax.ema_params(state)["w"], state[1].average["w"])


def test_blend_writes_the_bema_weights_into_a_reference():
  # TRL's `update_ref_model`: the reference network takes the BEMA weights.
  tx = optax.chain(optax.sgd(1.0), ema_jax.bema(update_freq=2, lag=1))
  params, state = _trained(tx)
  ref = ema_jax.blend(params, state, 1.0)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ema_jax.ema_params(state))):
    np.testing.assert_array_equal(a, b)


def test_mask_and_carried_leaves():
  params = {"w": jnp.ones(3), "frozen": jnp.zeros(2), "step": jnp.int32(0)}
  mask = {"w": True, "frozen": False, "step": True}
  tx = ema_jax.bema(update_freq=1, lag=1, mask=mask)  # the updates as given
  state = tx.init(params)
  step = {"w": jnp.ones(3), "frozen": jnp.ones(2), "step": jnp.int32(5)}
  updates, state = tx.update(step, state, params)
  params = optax.apply_updates(params, updates)
  read = ema_jax.ema_params(state)
  assert read["frozen"] is None
  assert int(read["step"]) == 5  # carried: the latest value
  assert state.origin["frozen"] is None and state.origin["step"] is None
  # t = 1, s = 2: EMA = 1 + 2 ** -0.5, weights = EMA + 2 ** -0.2 * (2 - 1).
  np.testing.assert_allclose(read["w"], 1 + 2**-0.5 + 2**-0.2, rtol=1e-6)
  swapped_in, swapped = ema_jax.swap(params, state)
  np.testing.assert_array_equal(swapped_in["frozen"], params["frozen"])
  np.testing.assert_array_equal(swapped_in["step"], params["step"])


def test_ema_dtype_and_bfloat16_params():
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  tx = optax.chain(optax.sgd(1.0), ema_jax.bema(update_freq=1))
  _, state = _trained(tx, params=params)
  for tree in (ema_jax.ema_params(state), state[1].average, state[1].origin):
    assert tree["w"].dtype == jnp.float32
  tx = optax.chain(optax.sgd(1.0), ema_jax.bema(update_freq=1, ema_dtype=jnp.bfloat16))
  _, state = _trained(tx, params=params)
  assert ema_jax.ema_params(state)["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(update_freq=0), "update_freq"),
        (dict(update_after=-1), "update_after"),
        (dict(ema_power=-0.5), "ema_power"),
        (dict(bias_power=-1.0), "bias_power"),
        (dict(lag=-1), "lag"),
        (dict(multiplier=0.0), "multiplier"),
        (dict(min_ema_multiplier=1.5), "min_ema_multiplier"),
        (dict(update_freq=1, lag=0, multiplier=0.5), "lag"),
    ],
    ids=str,
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    ema_jax.bema(**kwargs)


def test_state_of_another_transformation_is_refused():
  tx = ema_jax.bema()
  params = jnp.ones(2)
  with pytest.raises(TypeError, match="BemaState"):
    tx.update(params, ema_jax.ema().init(params), params)


def test_sharded_like_the_params():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
  params = {"w": jax.device_put(jnp.ones((8, 16)), sharding)}
  tx = optax.chain(optax.sgd(0.1), ema_jax.bema(update_freq=1))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    return optax.apply_updates(p, u), s

  params, state = step(params, state)
  b = state[1]
  for leaf in (b.weights.ema["w"], b.average["w"], b.origin["w"]):
    assert leaf.sharding.is_equivalent_to(sharding, 2)


def test_memory_kind_pinned_host():
  params = {"w": jnp.arange(4.0)}
  tx = optax.chain(optax.sgd(1.0), ema_jax.bema(update_freq=1, lag=1,
                                                memory_kind="pinned_host"))
  host = optax.chain(optax.sgd(1.0), ema_jax.bema(update_freq=1, lag=1))
  out = _run(tx, params, [jax.tree.map(jnp.ones_like, params)] * 3)
  ref = _run(host, params, [jax.tree.map(jnp.ones_like, params)] * 3)
  b = out[-1][1][1]
  for leaf in (b.weights.ema["w"], b.average["w"], b.origin["w"]):
    assert leaf.sharding.memory_kind == "pinned_host"
  np.testing.assert_allclose(ema_jax.ema_params(out[-1][1], memory_kind="device")["w"],
                             ema_jax.ema_params(ref[-1][1])["w"], rtol=1e-6)


def test_flax_hook_and_ema_weights():
  flax_helpers = pytest.importorskip("ema_jax.flax")
  import flax.linen as nn
  from flax.training.train_state import TrainState

  net = nn.Dense(2)
  x = jnp.ones((3, 4))
  state = TrainState.create(
      apply_fn=net.apply, params=net.init(jax.random.key(0), x)["params"],
      tx=optax.chain(optax.sgd(0.1), ema_jax.bema(update_freq=1, lag=1)))
  for _ in range(3):
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))
  expected = ema_jax.ema_params(state.opt_state)
  with flax_helpers.ema_weights(state) as swapped:
    for a, b in zip(jax.tree.leaves(swapped.params), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)
  hook = flax_helpers.SwapEMAWeights()
  swapped = hook.on_test_begin(state)
  back = hook.on_test_end(swapped)
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_roundtrip_and_refusal_of_an_ema_checkpoint():
  flax_helpers = pytest.importorskip("ema_jax.flax")
  ocp = pytest.importorskip("orbax.checkpoint")
  import flax.linen as nn
  from flax.training.train_state import TrainState

  net = nn.Dense(2)
  x = jnp.ones((3, 4))
  variables = net.init(jax.random.key(0), x)

  def make(ema_tx):
    return TrainState.create(apply_fn=net.apply, params=variables["params"],
                             tx=optax.chain(optax.sgd(0.1), ema_tx))

  state = make(ema_jax.bema(update_freq=1, lag=1))
  for _ in range(2):
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))
  directory = tempfile.mkdtemp()
  with ocp.CheckpointManager(os.path.join(directory, "bema")) as manager:
    flax_helpers.save_checkpoint(manager, 2, state)
    manager.wait_until_finished()
    restored = flax_helpers.restore_checkpoint(
        manager, make(ema_jax.bema(update_freq=1, lag=1)))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)

  plain = make(ema_jax.ema(0.9))
  plain = plain.apply_gradients(grads=jax.tree.map(jnp.ones_like, plain.params))
  with ocp.CheckpointManager(os.path.join(directory, "ema")) as manager:
    flax_helpers.save_checkpoint(manager, 1, plain)
    manager.wait_until_finished()
    with pytest.raises(ValueError, match=r"opt_state\.1\.average") as info:
      flax_helpers.restore_checkpoint(manager, make(ema_jax.bema(update_freq=1)))
  # Named as a missing EMA state, not as a leaf left out by a `mask`.
  assert "has no EMA state there" in str(info.value)
  assert "mask" not in str(info.value)


def test_example_smoke(tmp_path):
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, str(root / "examples" / "bema.py"), "--smoke", "--out", str(out)],
      capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=True,
  )
  lines = result.stdout.splitlines()
  header = lines.index(next(l for l in lines if l.split()[:1] == ["step"]))
  assert lines[header].split() == ["step", "params", "EMA", "BEMA", "BEMA-TRL"]
  rows = [l.split() for l in lines[header + 1 : header + 5]]
  assert [int(r[0]) for r in rows] == [10, 50, 100, 200]
  assert all(float(v) >= 0 for r in rows for v in r[1:])
  assert (out / "bema.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nnx_optimizer_and_ema_weights():
  pytest.importorskip("ema_jax.flax")
  from flax import nnx

  model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  tx = optax.chain(optax.sgd(0.1), ema_jax.bema(update_freq=1, lag=1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((3, 4))
  for _ in range(3):
    optimizer.update(model, nnx.grad(lambda m: (m(x) ** 2).sum())(model))
  raw = nnx.as_pure(nnx.state(model, nnx.Param))
  bema_weights = ema_jax.ema_params(nnx.as_pure(optimizer.opt_state))
  with ema_jax.flax.ema_weights(model, optimizer) as m:
    inside = nnx.as_pure(nnx.state(m, nnx.Param))
    for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(bema_weights)):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param))),
                  jax.tree.leaves(raw)):
    np.testing.assert_array_equal(a, b)


def test_sharded_update_has_no_collectives():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
  params = {"w": jax.device_put(jnp.ones((8, 16)), sharding)}
  tx = optax.chain(optax.sgd(0.1), ema_jax.bema(update_freq=2))
  state = tx.init(params)

  def step(p, s):
    u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    return optax.apply_updates(p, u), s

  text = jax.jit(step).lower(params, state).compile().as_text()
  for op in ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all"):
    assert f" {op}(" not in text and f" {op}-start(" not in text, op
