"""Power-function EMA profiles and post-hoc EMA, against numpy written from EDM2.

The references here are written from the published formulas (Karras et al.,
EDM2, CVPR 2024, Eqs. 3, 121, 127 and Algorithm 3) in float64 and do not call
`ema_jax`: gamma from sigma_rel by bisection on Eq. 3, inner products of
profiles from the integral `int_0^min(t_a, t_b) f_a f_b`, written in a form
other than the one `ema_jax.posthoc` uses.
"""

from __future__ import annotations

import gc
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import ema_jax
from ema_jax import _engine
from ema_jax import posthoc


# --- independent float64 references ------------------------------------------


def ref_gamma(sigma_rel: float) -> float:
  """Eq. 3 inverted by bisection: sigma_rel**2 = (g+1) / ((g+2)**2 (g+3))."""
  sigma = lambda g: np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
  lo, hi = 0.0, 1e4  # sigma decreases on [0, inf)
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if sigma(mid) > sigma_rel else (lo, mid)
  return 0.5 * (lo + hi)


def ref_inner(t_a, g_a, t_b, g_b):
  """int_0^min(t_a,t_b) (g_a+1) s^g_a / t_a^(g_a+1) * (g_b+1) s^g_b / t_b^(g_b+1) ds."""
  m = min(t_a, t_b)
  return (
      (g_a + 1) * (g_b + 1) * m ** (g_a + g_b + 1)
      / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1))
  )


def ref_weights(inputs, t_out, g_out):
  """Algorithm 3: solve the normal equations, normalise to sum 1."""
  a = np.array([[ref_inner(*i, *j) for j in inputs] for i in inputs])
  b = np.array([ref_inner(*i, t_out, g_out) for i in inputs])
  x = np.linalg.solve(a, b)
  return x / x.sum()


def ref_track(traj, gamma, update_every=1):
  """EDM2's PowerFunctionEMA in float64: beta = (1 - dt/t)^(gamma+1), Eq. 127.

  `traj[t - 1]` are the params after optimizer step t. Returns the EMA after
  each step (stale between updates when update_every > 1).
  """
  e = np.zeros(traj.shape[1:])
  out = []
  for t in range(1, len(traj) + 1):
    if t % update_every == 0:
      beta = (1 - update_every / t) ** (gamma + 1)
      e = beta * e + (1 - beta) * traj[t - 1]
    out.append(e.copy())
  return np.stack(out)


def karras_ema_pytorch(traj, gamma, update_every):
  """ema-pytorch's KarrasEMA.update() loop (post_hoc_ema.py, quoted in the notes)."""
  step, ema, initted = 0, None, False
  for c in range(len(traj)):
    p = traj[c]  # the params after optimizer step c + 1
    k = step
    step += 1
    if k % update_every != 0:
      continue
    if not initted:
      ema, initted = p.copy(), True
    beta = (1.0 - 1.0 / (step + 1.0)) ** (1.0 + gamma)
    ema = ema + (1 - beta) * (p - ema)
  return ema


def rel_width(weights):
  """sigma_rel of a profile over steps 1..T: its std over its end step T."""
  tau = np.arange(1, len(weights) + 1, dtype=np.float64)
  w = weights / weights.sum()
  mean = w @ tau
  return np.sqrt(w @ (tau - mean) ** 2) / len(weights)


# --- power-function profiles --------------------------------------------------


def test_sigma_rel_and_gamma_agree_with_the_bisection():
  for s in (0.03, 0.05, 0.1, 0.15, 0.2, 0.25, 0.28):
    assert ema_jax.sigma_rel_to_gamma(s) == pytest.approx(ref_gamma(s), rel=1e-9)


@pytest.mark.parametrize("update_every", [1, 4, 10])
def test_power_decay_with_update_every_is_edm2_beta(update_every):
  gamma = ema_jax.sigma_rel_to_gamma(0.1)
  rule = jax.jit(
      _engine.schedule_rule([ema_jax.power_decay(gamma=gamma)], 0, update_every)
  )
  for count in [0, 1, 2, 3, 8, 9, 10, 19, 99, 999, 9_999, 99_999]:
    active, weight, _ = rule(jnp.int32(count))
    t = count + 1  # optimizer steps done after this update
    assert bool(active) == (t % update_every == 0)
    if t % update_every == 0:
      # EDM2 Eq. 127, as the weight of the new value, in float64.
      with np.errstate(divide="ignore"):  # t == update_every: log1p(-1) = -inf
        want = -np.expm1((gamma + 1) * np.log1p(-update_every / t))
      assert float(weight[0]) == pytest.approx(want, rel=2e-6), count


def _profile(tx, steps):
  """The weights an EMA gives each step: run it on one-hot params."""
  eye = jnp.eye(steps, dtype=jnp.float32)
  state = tx.init(jnp.zeros(steps))
  step = jax.jit(lambda s, p: tx.update(jnp.zeros(steps), s, p)[1])
  for t in range(steps):
    state = step(state, eye[t])
  return np.asarray(state.ema, np.float64)


@pytest.mark.parametrize("update_every", [1, 10])
def test_profile_in_optimizer_steps_matches_edm2_and_ema_pytorch_karras_is_off(
    update_every,
):
  steps, sigma = 400, 0.1
  gamma = ref_gamma(sigma)
  eye = np.eye(steps)
  ours = _profile(
      ema_jax.ema(ema_jax.power_decay(sigma_rel=sigma), update_every=update_every),
      steps,
  )
  edm2 = ref_track(eye, gamma, update_every)[-1]
  np.testing.assert_allclose(ours, edm2, atol=2e-6)
  # Sampling every 10th step coarsens the profile a little, but keeps its width.
  assert rel_width(ours) == pytest.approx(sigma, rel=0.03)
  karras = karras_ema_pytorch(eye, gamma, update_every)
  if update_every == 1:
    # One step late: (1 - 1/(t+1)) instead of (1 - 1/t), nearly harmless.
    assert rel_width(karras) == pytest.approx(sigma, rel=0.03)
  else:
    # Its beta ignores update_every: gamma + 1 shrinks k-fold in effect, so the
    # profile is about three times as wide as asked.
    assert rel_width(karras) > 2.5 * sigma


# --- post-hoc EMA on a known trajectory ------------------------------------


STEPS, EVERY, DIM = 1000, 100, 64
TRACKED = (0.05, 0.10)
WANTED = (0.05, 0.075, 0.10, 0.15, 0.20, 0.25)


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
  """A random walk, tracked by ema_jax with snapshots in float32 and float16."""
  rng = np.random.default_rng(0)
  traj = np.cumsum(rng.normal(size=(STEPS, DIM)), axis=0).astype(np.float32)
  dirs = {
      name: tmp_path_factory.mktemp(f"snapshots_{name}") for name in ("f32", "f16")
  }
  snap32 = posthoc.Snapshotter(dirs["f32"], every=EVERY, sigma_rels=TRACKED)
  snap16 = posthoc.Snapshotter(
      dirs["f16"], every=EVERY, sigma_rels=TRACKED, dtype=jnp.float16
  )
  tx = snap32.ema()
  state = tx.init(jnp.zeros(DIM))
  # Zero updates: the EMAs see `params`, exactly the trajectory.
  step = jax.jit(lambda s, p: tx.update(jnp.zeros(DIM), s, p)[1])
  for t in range(1, STEPS + 1):
    state = step(state, jnp.asarray(traj[t - 1]))
    snap32.maybe_save(state, step=t)
    snap16.maybe_save(state, step=t)
  snap32.close()
  snap16.close()
  return traj.astype(np.float64), dirs, state


def ref_synthesize(traj, sigma, step, snapshots=None, update_every=1):
  """EDM2's post-hoc reconstruction in float64 from float64 snapshots.

  `snapshots`: their steps, by default every `EVERY` steps up to `step`.
  """
  tracks = {s: ref_track(traj, ref_gamma(s), update_every) for s in TRACKED}
  inputs, values = [], []
  if snapshots is None:
    snapshots = range(EVERY, step + 1, EVERY)
  for t in snapshots:
    for s in TRACKED:
      inputs.append((t, ref_gamma(s)))
      values.append(tracks[s][t - 1])
  x = ref_weights(inputs, step, ref_gamma(sigma))
  return x @ np.stack(values)


def rms(x):
  return float(np.sqrt(np.mean(np.square(x))))


@pytest.mark.parametrize("step", [STEPS, 500])
def test_synthesis_matches_edm2_in_float64_and_beats_float16(walk, step):
  traj, dirs, _ = walk
  scale = rms(traj[:step])
  for sigma in WANTED:
    direct = ref_track(traj, ref_gamma(sigma))[step - 1]
    ref = ref_synthesize(traj, sigma, step)
    ours = np.asarray(posthoc.synthesize(dirs["f32"], sigma, step=step), np.float64)
    ours16 = np.asarray(posthoc.synthesize(dirs["f16"], sigma, step=step), np.float64)
    limit = rms(ref - direct)  # what the algorithm itself gets on these snapshots
    dev, dev16 = rms(ours - ref), rms(ours16 - ref)
    # float32 snapshots and sums: within float32 rounding of the float64 result,
    # so as close to the tracked EMA as the float64 algorithm gets.
    assert dev < 2e-6 * scale, (sigma, dev, scale)
    assert rms(ours - direct) <= limit + 2e-6 * scale
    if sigma not in TRACKED:
      assert dev < 2e-3 * limit, (sigma, dev, limit)
    # float16 snapshots lose far more than float32 ones.
    assert dev16 > 30 * dev, (sigma, dev16, dev)


def test_tracked_widths_come_back_and_output_is_float32(walk):
  _, dirs, state = walk
  for i, sigma in enumerate(TRACKED):
    got = posthoc.synthesize(dirs["f32"], sigma_rel=sigma)
    assert got.dtype == jnp.float32 and got.shape == (DIM,)
    np.testing.assert_allclose(got, ema_jax.ema_params(state, index=i), rtol=0, atol=2e-5)


def test_solve_weights_matches_the_integral_form():
  rng = np.random.default_rng(1)
  inputs = [(t, ref_gamma(s)) for t in (100, 200, 350, 500) for s in TRACKED]
  for _ in range(5):
    t_out = float(rng.choice([200, 350, 500]))
    g_out = ref_gamma(float(rng.uniform(0.05, 0.25)))
    want = ref_weights(inputs, t_out, g_out)
    got = posthoc.solve_weights(
        [t for t, _ in inputs], [g for _, g in inputs], t_out, g_out
    )
    assert got.dtype == np.float64 and got.shape == (len(inputs), 1)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-8, atol=1e-10)


def test_one_snapshot_in_memory_at_a_time(walk, monkeypatch):
  _, dirs, _ = walk
  restore = posthoc._Reader.restore
  previous: list[weakref.ref] = []
  alive_at_restore = []

  def tracking_restore(self, step, like):
    gc.collect()
    alive_at_restore.append(sum(r() is not None for r in previous))
    tree = restore(self, step, like)
    previous.clear()
    previous.extend(weakref.ref(x) for x in jax.tree.leaves(tree))
    return tree

  monkeypatch.setattr(posthoc._Reader, "restore", tracking_restore)
  posthoc.synthesize(dirs["f32"], sigma_rel=0.15)
  assert len(alive_at_restore) == STEPS // EVERY
  assert alive_at_restore == [0] * len(alive_at_restore)


# --- trees, shardings, update_every, errors ----------------------------------


class Model(NamedTuple):
  dense: dict
  count: jax.Array
  frozen: jax.Array


def _model_run(directory, mesh=None, update_every=1, steps=40, every=10):
  w = jnp.arange(48, dtype=jnp.float32).reshape(8, 6) / 10
  params = Model({"w": w, "b": jnp.ones(6, jnp.bfloat16)}, jnp.int32(0), jnp.ones(3))
  if mesh is not None:
    params = jax.device_put(
        params,
        Model(
            {"w": NamedSharding(mesh, P("data", "model")),
             "b": NamedSharding(mesh, P("model"))},
            NamedSharding(mesh, P()),
            NamedSharding(mesh, P()),
        ),
    )
  snapshotter = posthoc.Snapshotter(directory, every=every, update_every=update_every)
  mask = Model({"w": True, "b": True}, True, False)
  tx = optax.chain(optax.identity(), snapshotter.ema(mask=mask))
  state = tx.init(params)

  @jax.jit
  def train(params, state):
    updates = Model(
        jax.tree.map(lambda x: (-0.01 * jnp.cos(x)).astype(x.dtype), params.dense),
        jnp.int32(1),
        jnp.zeros(3),
    )
    updates, state = tx.update(updates, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for t in range(1, steps + 1):
    params, state = train(params, state)
    history.append(params)
    snapshotter.maybe_save(state)
  snapshotter.close()
  return params, state, history


def test_tree_structure_carried_and_masked_leaves(tmp_path):
  params, state, _ = _model_run(tmp_path)
  got = posthoc.synthesize(tmp_path, sigma_rel=0.10, like=params)
  assert isinstance(got, Model)
  want = ema_jax.ema_params(state[1], index=1)
  np.testing.assert_allclose(got.dense["w"], want.dense["w"], atol=1e-5)
  np.testing.assert_allclose(got.dense["b"], want.dense["b"], atol=1e-5)
  assert got.dense["b"].dtype == jnp.float32  # the EMA of bf16 params is f32
  assert int(got.count) == 40 and got.count.dtype == jnp.int32
  assert got.frozen is None
  got20 = posthoc.synthesize(tmp_path, sigma_rel=0.10, step=20, like=params)
  assert int(got20.count) == 20
  # Without `like`, Orbax's containers come back, with the same leaves.
  plain = posthoc.synthesize(tmp_path, sigma_rel=0.10)
  np.testing.assert_array_equal(
      np.asarray(plain["dense"]["w"]), np.asarray(got.dense["w"])
  )


def test_shardings_are_kept(tmp_path):
  mesh = jax.make_mesh(
      (4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  params, state, _ = _model_run(tmp_path, mesh=mesh)
  stacked = state[1].ema.dense["w"]
  assert stacked.sharding.spec == P(None, "data", "model")
  plain = posthoc.synthesize(tmp_path, sigma_rel=0.15)
  assert plain["dense"]["w"].sharding.is_equivalent_to(params.dense["w"].sharding, 2)
  got = posthoc.synthesize(tmp_path, sigma_rel=0.15, like=params)
  assert got.dense["w"].sharding.is_equivalent_to(params.dense["w"].sharding, 2)
  assert got.dense["b"].sharding.is_equivalent_to(params.dense["b"].sharding, 1)
  # `like` may ask for other shardings, e.g. to evaluate on a single device.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), params)
  single = posthoc.synthesize(tmp_path, sigma_rel=0.15, like=like)
  assert single.dense["w"].sharding == one
  np.testing.assert_array_equal(np.asarray(single.dense["w"]), np.asarray(got.dense["w"]))


def test_update_every_snapshots_match_edm2_with_delta_t(tmp_path):
  params, state, history = _model_run(tmp_path, update_every=5, steps=60, every=20)
  traj = np.stack([np.asarray(p.dense["w"], np.float64) for p in history])
  inputs, values = [], []
  for t in (20, 40, 60):
    for s in TRACKED:
      inputs.append((t, ref_gamma(s)))
      values.append(ref_track(traj, ref_gamma(s), update_every=5)[t - 1])
  np.testing.assert_allclose(
      ema_jax.ema_params(state[1], index=0).dense["w"], values[-2], rtol=1e-5
  )
  x = ref_weights(inputs, 60, ref_gamma(0.2))
  got = posthoc.synthesize(tmp_path, sigma_rel=0.2, like=params)
  want = np.tensordot(x, np.stack(values), axes=1)
  np.testing.assert_allclose(got.dense["w"], want, rtol=1e-5, atol=1e-5)


def test_sweep_returns_the_best_by_the_metric(walk):
  traj, dirs, _ = walk
  target = ref_track(traj, ref_gamma(0.15))[-1]
  loss = lambda p: rms(np.asarray(p, np.float64) - target)
  result = posthoc.sweep(dirs["f32"], WANTED, loss, higher_is_better=False)
  assert list(result.scores) == list(WANTED)
  assert result.best_sigma_rel == min(result.scores, key=result.scores.get) == 0.15
  assert result.best_score == result.scores[0.15]
  np.testing.assert_array_equal(
      result.best_params, posthoc.synthesize(dirs["f32"], sigma_rel=0.15)
  )
  worst = posthoc.sweep(dirs["f32"], WANTED, loss)  # higher is better: the worst
  assert worst.best_sigma_rel == max(result.scores, key=result.scores.get)


def test_resume_keeps_snapshots_and_skips_existing_steps(tmp_path):
  params = jnp.zeros(2)
  with posthoc.Snapshotter(tmp_path, every=1) as first:
    tx = first.ema()
    state = tx.init(params)
    for _ in range(3):
      _, state = tx.update(jnp.zeros(2), state, params + 1)
      assert first.maybe_save(state)
  with posthoc.Snapshotter(tmp_path, every=1, existing="resume") as again:
    assert again.steps == (1, 2, 3)
    assert again.save(state) is None  # step 3 is there already
    assert not again.maybe_save(state)


def test_errors_name_the_argument(tmp_path):
  with pytest.raises(ValueError, match="multiple of `update_every`"):
    posthoc.Snapshotter(tmp_path, every=10, update_every=3)
  with pytest.raises(ValueError, match="not both"):
    posthoc.Snapshotter(tmp_path, every=10, sigma_rels=[0.1], gammas=[7.0])
  with pytest.raises(ValueError, match="floating dtype|`ema_dtype` must be one of"):
    posthoc.Snapshotter(tmp_path, every=10, dtype=jnp.int8)
  with pytest.raises(ValueError, match="sigma_rel"):
    posthoc.Snapshotter(tmp_path, every=10, sigma_rels=[0.5])
  snapshotter = posthoc.Snapshotter(tmp_path, every=2, update_every=2)
  tx = snapshotter.ema()
  params = jnp.zeros(2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="no update yet"):
    snapshotter.save(state)
  _, state = tx.update(params, state, params)
  with pytest.raises(ValueError, match="last updated at step 0"):
    snapshotter.save(state)
  other = ema_jax.multi_ema([0.9, 0.99, 0.999]).init(params)
  with pytest.raises(ValueError, match="records no power profile"):
    snapshotter.save(other)
  with pytest.raises(ValueError, match="not the `MultiEmaState`"):
    snapshotter.save(ema_jax.ema(0.9).init(params))
  _, swapped = ema_jax.swap(params, state, index=0)
  with pytest.raises(ValueError, match="swap back before saving"):
    snapshotter.save(swapped)
  _, state = tx.update(params, state, params)
  with pytest.raises(ValueError, match="`step=4` but the EMA state has seen 2"):
    snapshotter.maybe_save(state, step=4)
  assert snapshotter.maybe_save(state, step=2)
  snapshotter.close()
  with pytest.raises(ValueError, match=r"`step=3` has no snapshot.*\[2\]"):
    posthoc.synthesize(tmp_path, sigma_rel=0.1, step=3)
  with pytest.raises(ValueError, match="exactly one of `sigma_rel` and `gamma`"):
    posthoc.synthesize(tmp_path, sigma_rel=0.1, gamma=7.0)
  with pytest.raises(ValueError, match=r"`like` is not the tree.*leaf \[0\] is in `like`"):
    posthoc.synthesize(tmp_path, sigma_rel=0.1, like=[params, params])
  with pytest.raises(ValueError, match="no directory"):
    posthoc.synthesize(tmp_path / "missing", sigma_rel=0.1)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="No snapshots"):
    posthoc.synthesize(tmp_path / "empty", sigma_rel=0.1)


# --- snapshots that cannot be mixed or lost ------------------------------------


def _ramp(directory, steps, params=None, **kwargs):
  """Track `params + t` for t = 1..steps with a Snapshotter; its last state."""
  params = {"w": jnp.zeros(3)} if params is None else params
  snapshotter = posthoc.Snapshotter(directory, **kwargs)
  tx = snapshotter.ema()
  state = tx.init(params)
  for t in range(1, steps + 1):
    target = jax.tree.map(lambda p: p + t, params)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, target)
    snapshotter.maybe_save(state)
  snapshotter.close()
  return state


def _steps(directory):
  """The finished snapshot steps in `directory`, read without writing."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(directory) as manager:
    return tuple(sorted(manager.all_steps()))


def _move_step(source, step, destination):
  """Put snapshot `step` of one directory into another, as a careless copy would."""
  import shutil
  shutil.copytree(source / str(step), destination / str(step))


def test_synthesize_refuses_snapshots_of_two_models(tmp_path):
  first, second = tmp_path / "a", tmp_path / "b"
  _ramp(first, 20, every=10)
  # The same leaf count and shapes, another model: combining by position
  # would mix `w` with `v`.
  _ramp(second, 30, params={"v": jnp.zeros(3)}, every=10)
  _move_step(second, 30, first)
  with pytest.raises(ValueError, match=r"leaf \['v'\] is in the snapshot of step 30 but not in that of step 10"):
    posthoc.synthesize(first, sigma_rel=0.1)


def test_synthesize_refuses_snapshots_of_another_shape_or_profile(tmp_path):
  first, shape, profile = tmp_path / "a", tmp_path / "shape", tmp_path / "profile"
  _ramp(first, 20, every=10)
  _ramp(shape, 30, params={"w": jnp.zeros(4)}, every=10)
  _ramp(profile, 30, every=10, sigma_rels=(0.05, 0.2))
  mixed = tmp_path / "mixed"
  import shutil
  shutil.copytree(first, mixed)
  _move_step(shape, 30, mixed)
  with pytest.raises(ValueError, match=r"\['w'\].*shape \(4,\).*\(3,\)|\['w'\].*\(3,\).*\(4,\)"):
    posthoc.synthesize(mixed, sigma_rel=0.1)
  _move_step(profile, 30, first)
  with pytest.raises(ValueError, match=r"`sigma_rels` is \(0.05, 0.2\) in the snapshot of step 30 but \(0.05, 0.1\)"):
    posthoc.synthesize(first, sigma_rel=0.1)


@pytest.mark.parametrize("setting", [
    {"every": 30}, {"sigma_rels": (0.05, 0.2)}, {"every": 10, "update_every": 5},
])
def test_snapshotter_refuses_a_directory_with_other_settings(tmp_path, setting):
  _ramp(tmp_path, 20, every=10)
  name = [k for k in setting if k != "every"] or ["every"]
  with pytest.raises(ValueError, match=f"`{name[0]}`"):
    posthoc.Snapshotter(tmp_path, **{"every": 10, **setting}, existing="resume")


def test_snapshotter_refuses_a_directory_of_another_model(tmp_path):
  _ramp(tmp_path, 20, every=10)
  with pytest.raises(ValueError, match=r"\['v'\]"):
    _ramp(tmp_path, 30, params={"v": jnp.zeros(3)}, every=10, existing="resume")
  assert _steps(tmp_path) == (10, 20)


def _restart(directory, steps, offset, **kwargs):
  """A run from step 1 into `directory`: params `offset + t`; its Snapshotter, open."""
  snapshotter = posthoc.Snapshotter(directory, **kwargs)
  tx = snapshotter.ema()
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  for t in range(1, steps + 1):
    _, state = tx.update(params, state, {"w": jnp.full(3, offset + t, jnp.float32)})
    assert not snapshotter.maybe_save(state)  # below the latest: never reported
  return snapshotter, state


def test_a_restart_below_the_latest_snapshot_is_refused_not_lost(tmp_path):
  _ramp(tmp_path, 200, every=100)
  # The same run again (as when resumed from an early checkpoint): step 100
  # is on disk and matches; step 150 cannot be written after step 200.
  snapshotter, state = _restart(tmp_path, 150, 0.0, every=100, existing="resume")
  with pytest.raises(ValueError, match=r"step 150.*latest snapshot.*200"):
    snapshotter.save(state)
  with pytest.raises(ValueError, match=r"step 150.*latest snapshot.*200"):
    snapshotter.close()  # nor the tail: it would be below step 200
  assert _steps(tmp_path) == (100, 200)


def test_a_restart_of_another_run_into_the_directory_is_refused(tmp_path):
  _ramp(tmp_path, 200, every=100)
  with pytest.raises(ValueError, match=r"step 100.*not this run's EMA.*\['w'\]"):
    _restart(tmp_path, 100, 0.5, every=100, existing="resume")


def test_every_redone_step_is_compared_not_only_the_first(tmp_path):
  _ramp(tmp_path, 200, every=100)
  snapshotter = posthoc.Snapshotter(tmp_path, every=100, existing="resume")
  tx = snapshotter.ema()
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"step 200.*not this run's EMA"):
    for t in range(1, 201):  # the old run's up to step 150, then another's
      target = {"w": jnp.full(3, t + (0.5 if t > 150 else 0.0), jnp.float32)}
      _, state = tx.update(params, state, target)
      assert not snapshotter.maybe_save(state, step=t)  # 100 matches: kept
  snapshotter.close()


def test_duplicate_widths_fail_when_built(tmp_path):
  with pytest.raises(ValueError, match=r"`sigma_rels`.*0\.1.*twice"):
    posthoc.Snapshotter(tmp_path, every=10, sigma_rels=(0.1, 0.1))
  with pytest.raises(ValueError, match=r"`gammas`.*7\.0.*twice"):
    posthoc.Snapshotter(tmp_path, every=10, gammas=(7.0, 6.0, 7.0))


def test_one_snapshot_of_one_width_cannot_change_the_width(tmp_path):
  state = _ramp(tmp_path, 10, every=10, sigma_rels=(0.1,))
  got = posthoc.synthesize(tmp_path, sigma_rel=0.1)
  np.testing.assert_array_equal(got["w"], ema_jax.ema_params(state, index=0)["w"])
  with pytest.raises(ValueError, match=r"one snapshot.*sigma_rel=0\.1.*0\.2"):
    posthoc.synthesize(tmp_path, sigma_rel=0.2)
  with pytest.raises(ValueError, match=r"one snapshot"):
    posthoc.sweep(tmp_path, [0.1, 0.2], lambda p: 0.0)


def test_like_is_matched_by_leaf_path(tmp_path):
  _ramp(tmp_path, 10, params={"w": jnp.zeros(3), "b": jnp.zeros(2)}, every=10)
  with pytest.raises(ValueError, match=r"`like`.*\['v'\]"):
    posthoc.synthesize(tmp_path, sigma_rel=0.1, like={"v": jnp.zeros(3), "b": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"`like`.*\['w'\].*\(4,\).*\(3,\)"):
    posthoc.synthesize(tmp_path, sigma_rel=0.1, like={"w": jnp.zeros(4), "b": jnp.zeros(2)})


@pytest.mark.parametrize("update_every, steps, tail", [(1, 250, 250), (5, 253, 250)])
def test_close_snapshots_the_tail_and_synthesis_matches_edm2(
    tmp_path, update_every, steps, tail
):
  rng = np.random.default_rng(2)
  traj = np.cumsum(rng.normal(size=(steps, DIM)), axis=0).astype(np.float32)
  dirs = [tmp_path / "tail", tmp_path / "no_tail"]
  snapshotters = [
      posthoc.Snapshotter(d, every=100, update_every=update_every, save_on_close=on)
      for d, on in zip(dirs, (True, False))
  ]
  tx = snapshotters[0].ema()
  state = tx.init(jnp.zeros(DIM))
  step = jax.jit(lambda s, p: tx.update(jnp.zeros(DIM), s, p)[1])
  for t in range(1, steps + 1):
    state = step(state, jnp.asarray(traj[t - 1]))
    for snapshotter in snapshotters:
      snapshotter.maybe_save(state, step=t)
  for snapshotter in snapshotters:
    snapshotter.close()
  assert snapshotters[0].steps == (100, 200, tail)
  assert snapshotters[1].steps == (100, 200)
  traj = traj.astype(np.float64)
  scale = rms(traj)
  for sigma in (0.05, 0.10, 0.15, 0.25):
    direct = ref_track(traj, ref_gamma(sigma), update_every)[-1]
    ref = ref_synthesize(traj, sigma, tail, (100, 200, tail), update_every)
    got = np.asarray(posthoc.synthesize(dirs[0], sigma), np.float64)
    assert rms(got - ref) < 2e-6 * scale, sigma
    if sigma in TRACKED:  # a tracked width comes back as the tracker's
      np.testing.assert_allclose(
          got, ema_jax.ema_params(state, index=TRACKED.index(sigma)), atol=1e-5 * scale
      )
      # Without the tail, the last synthesis is of step 200, off the EMA at
      # the end of training by what the last steps moved it.
      old = np.asarray(posthoc.synthesize(dirs[1], sigma), np.float64)
      assert rms(old - direct) > 1e4 * rms(got - direct), sigma


def test_close_refuses_a_donated_last_state_and_skips_the_tail_on_errors(tmp_path):
  params = jnp.zeros(3)
  snapshotter = posthoc.Snapshotter(tmp_path / "donated", every=10)
  tx = snapshotter.ema()
  step = jax.jit(lambda s, p: tx.update(jnp.zeros(3), s, p)[1], donate_argnums=0)
  state = tx.init(params)
  for t in range(1, 4):
    state = step(state, params + t)
    snapshotter.maybe_save(state, step=t)
  state = step(state, params)  # donates the state of step 3
  with pytest.raises(ValueError, match=r"last step seen \(3\).*donated.*save\(opt_state\)"):
    snapshotter.close()
  with pytest.raises(RuntimeError, match="stop"):
    with posthoc.Snapshotter(tmp_path / "error", every=10) as snapshotter:
      snapshotter.maybe_save(state)
      raise RuntimeError("stop")
  assert not (tmp_path / "error" / "4").exists()
  with posthoc.Snapshotter(tmp_path / "ok", every=10) as snapshotter:
    snapshotter.maybe_save(state)
  assert snapshotter.steps == (4,)
  with pytest.raises(TypeError, match="`save_on_close` must be True or False"):
    posthoc.Snapshotter(tmp_path, every=10, save_on_close="no")


def test_close_snapshots_the_tail_of_the_tracker_picked_by_which(tmp_path):
  snapshotter = posthoc.Snapshotter(tmp_path, every=10, which=1)
  tx = optax.chain(ema_jax.ema(0.9), snapshotter.ema())
  params = jnp.zeros(3)
  state = tx.init(params)
  for t in range(1, 4):
    _, state = tx.update(params, state, params + t)
    assert not snapshotter.maybe_save(state)
  snapshotter.close()
  assert snapshotter.steps == (3,)
  np.testing.assert_array_equal(
      posthoc.synthesize(tmp_path, sigma_rel=0.05),
      ema_jax.ema_params(state, which=1, index=0),
  )


@pytest.mark.standard_promotion  # optax is not strict-clean
def test_maybe_save_walks_the_state_once(tmp_path, monkeypatch):
  snapshotter = posthoc.Snapshotter(tmp_path, every=10)
  tx = optax.chain(optax.adam(0.1), snapshotter.ema())
  params = jnp.zeros(3)
  state = tx.init(params)
  walks = []
  find = posthoc._state.find
  monkeypatch.setattr(
      posthoc._state, "find", lambda *a: walks.append(1) or find(*a)
  )
  for t in range(1, 10):  # the tracker's place is found once, then looked up
    _, state = tx.update(params, state, params)
    assert not snapshotter.maybe_save(state, step=t)
  assert walks == [1]
  snapshotter.close()
  assert walks == [1] and snapshotter.steps == (9,)


def _live_bytes():
  return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


@pytest.mark.standard_promotion
@pytest.mark.parametrize("update_every", [1, 2])
def test_maybe_save_keeps_no_extra_optimizer_state_alive(tmp_path, update_every):
  """Between updates, without donation, what stays alive after `maybe_save` is
  the caller's params and optimizer state, and nothing of an older state."""
  snapshotter = posthoc.Snapshotter(
      tmp_path, every=10 * update_every, update_every=update_every
  )
  tx = optax.chain(optax.adam(1e-3), snapshotter.ema())
  n = 1 << 18  # 1 MiB a float32 leaf
  params = {"w": jnp.ones(n), "step": jnp.zeros((), jnp.int32)}
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
  extra = []
  for t in range(1, 4):
    updates, state = step(params, state)
    params = {"w": params["w"] - updates["w"], "step": params["step"] + 1}
    del updates
    baseline = _live_bytes()  # params and the current state: 5 MiB
    snapshotter.maybe_save(state, step=t)
    extra.append(_live_bytes() - baseline)
    # What the Snapshotter holds when this state is replaced by the next.
    last = () if snapshotter._last is None else snapshotter._last[1]
    held = sum(x.nbytes for x in jax.tree.leaves(last)
               if not any(x is y for y in jax.tree.leaves(state)))
    extra.append(held)
  # Held at most: the carried integer leaf and the count of an update step
  # (before the fix: a whole optimizer state, 4 MiB, when not donated).
  assert max(extra) <= 16, extra
  snapshotter.close()
  assert snapshotter.steps == (3 - 3 % update_every,)
  np.testing.assert_array_equal(
      posthoc.synthesize(tmp_path, sigma_rel=0.1)["w"],
      ema_jax.ema_params(state, index=1)["w"],
  )


def test_a_redone_step_of_all_zero_averages_matches(tmp_path):
  params = jnp.zeros(3)
  for existing in ("refuse", "resume"):  # the same run twice: step 2 is redone
    with posthoc.Snapshotter(tmp_path, every=2, existing=existing) as snapshotter:
      tx = snapshotter.ema()
      state = tx.init(params)
      for t in range(1, 3):
        _, state = tx.update(params, state, params)
        snapshotter.maybe_save(state, step=t)
  assert snapshotter.steps == (2,)
