"""Performance contracts that do not depend on a clock.

* XLA's memory analysis of the recommended step (jitted, params and optimizer
  state donated, gradients passed as an argument) shows no EMA-sized temporary.
* `apply_updates_and_average` gives bit for bit what the chained `ema()` and
  `optax.apply_updates` give, and what an independent float64 formula gives.
* The benchmark's smoke mode runs and writes the JSON it promises.

No test asserts a time: the figures live in docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_jax
from _util import ROOT, run_smoke
from ema_jax import _engine

sys.path.insert(0, str(ROOT / "benchmarks"))
import first_step  # noqa: E402  (benchmarks/first_step.py: the first-step cases)

N = 2**20  # ~1e6 elements, as the issue asks
OPTIMIZERS = {"sgd": lambda: optax.sgd(1e-3), "adam": lambda: optax.adam(1e-3)}


def _shapes(leaves: int, dtype: Any) -> dict[str, jax.ShapeDtypeStruct]:
  return {f"w{i}": jax.ShapeDtypeStruct((N // leaves,), dtype) for i in range(leaves)}


def _chain_step(tx: optax.GradientTransformation):
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _fused_step(opt: optax.GradientTransformation, decay: float = 0.999):
  def step(params, state, grads):
    opt_state, ema = state
    updates, opt_state = opt.update(grads, opt_state, params)
    params, ema = ema_jax.apply_updates_and_average(params, updates, ema, decay)
    return params, (opt_state, ema)

  return step


def _memory(path: str, opt_name: str, leaves: int, dtype: Any, **ema_kwargs: Any):
  params = _shapes(leaves, dtype)
  opt = OPTIMIZERS[opt_name]()
  if path == "chain":
    tx = optax.chain(opt, ema_jax.ema(0.999, **ema_kwargs))
    step, state = _chain_step(tx), jax.eval_shape(tx.init, params)
  else:
    ema_tx = ema_jax.ema(0.999)
    step = _fused_step(opt)
    state = jax.eval_shape(
        lambda p: (opt.init(p), ema_jax.ema_params(ema_tx.init(p))), params
    )
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  return compiled.memory_analysis(), state


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("path", ["chain", "fused"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("leaves", [1, 8])
def test_donated_step_has_no_ema_sized_temporary(path, opt_name, dtype, leaves):
  mem, state = _memory(path, opt_name, leaves, dtype)
  ema_bytes = N * 4  # float32 average, also for bfloat16 params
  assert mem.temp_size_in_bytes < ema_bytes // 64, mem
  # Updated in place: every donated params/state byte is reused by an output.
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  param_bytes = N * jnp.dtype(dtype).itemsize
  assert mem.alias_size_in_bytes >= param_bytes + state_bytes - 64, mem


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "kwargs", [{"update_every": 2}, {"debias": True}, {"start_step": 3}],
    ids=["update_every", "debias", "start_step"],
)
@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_options_add_no_ema_sized_temporary(opt_name, dtype, kwargs):
  # update_every averages under a lax.cond: the branch must read the step's new
  # params, not keep the old params and the updates alive for itself.
  mem, state = _memory("chain", opt_name, 1, dtype, **kwargs)
  assert mem.temp_size_in_bytes < N * 4 // 64, mem
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert mem.alias_size_in_bytes >= N * jnp.dtype(dtype).itemsize + state_bytes - 64, mem


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
def test_memory_check_sees_the_closure_trap():
  # A control: gradients captured by a closure become constants, and XLA then
  # plans an EMA-sized temporary. The check above would catch it.
  opt = optax.adam(1e-3)
  tx = optax.chain(opt, ema_jax.ema(0.999))
  params = {"w": jnp.zeros(N)}
  grads = {"w": jnp.full(N, 1e-3)}

  def step(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state = jax.eval_shape(tx.init, params)
  mem = (
      jax.jit(step, donate_argnums=(0, 1))
      .lower(jax.eval_shape(lambda: params), state)
      .compile()
      .memory_analysis()
  )
  assert mem.temp_size_in_bytes >= N * 4


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU behaviour")
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_cpu_barrier_is_what_removes_the_bf16_temporaries(monkeypatch, opt_name):
  # Without `_engine._materialize`, XLA:CPU folds `p + u` into the EMA loop for
  # bfloat16 params, and must then copy the donated params and materialise the
  # updates. If XLA stops doing so, this fails and the barrier can go.
  monkeypatch.setattr(_engine, "_materialize", lambda x: x)
  mem, _ = _memory("chain", opt_name, 1, jnp.bfloat16)
  assert mem.temp_size_in_bytes >= N * 2


# ---------------------------------------------------------------------------
# The fused path


def _bits(tree: Any) -> list[bytes | None]:
  return [
      None if x is None else (str(np.asarray(x).dtype), np.asarray(x).tobytes())
      for x in jax.tree.leaves(tree, is_leaf=lambda x: x is None)
  ]


def _params(dtype: Any, seed: int = 0) -> dict[str, Any]:
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {
      "a": jax.random.normal(k1, (3, 5)).astype(dtype),
      "b": {"c": jax.random.normal(k2, (7,)).astype(dtype)},
  }


def _grads(params: Any, seed: int) -> Any:
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(100 + seed), len(leaves))
  return jax.tree.unflatten(
      treedef,
      [jax.random.normal(k, x.shape).astype(x.dtype) for k, x in zip(keys, leaves)],
  )


@pytest.mark.standard_promotion  # optax/keras are not strict-clean
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_fused_is_bitwise_the_chain(dtype, jit, opt_name):
  opt = OPTIMIZERS[opt_name]()
  chain = optax.chain(opt, ema_jax.ema(0.9))
  chain_step, fused_step = _chain_step(chain), _fused_step(opt, 0.9)
  if jit:
    chain_step = jax.jit(chain_step, donate_argnums=(0, 1))
    fused_step = jax.jit(fused_step, donate_argnums=(0, 1))
  params = _params(dtype)
  p1, s1 = jax.tree.map(jnp.copy, params), chain.init(params)
  p2 = jax.tree.map(jnp.copy, params)
  s2 = (opt.init(params), ema_jax.ema_params(chain.init(params)))
  for t in range(6):
    grads = _grads(params, t)
    p1, s1 = chain_step(p1, s1, grads)
    p2, s2 = fused_step(p2, s2, grads)
    assert _bits(p1) == _bits(p2)
    assert _bits(ema_jax.ema_params(s1)) == _bits(s2[1])
  assert jax.tree.leaves(s2[1])[0].dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_fused_matches_a_float64_formula(dtype):
  params = _params(dtype)
  ema = jax.tree.map(lambda p: p.astype(jnp.float32) * 0.5, params)
  updates = _grads(params, 0)
  decay = 0.75
  new_p, new_e = ema_jax.apply_updates_and_average(params, updates, ema, decay)
  for p, u, e, np_, ne in zip(*map(jax.tree.leaves, (params, updates, ema, new_p, new_e))):
    p64 = np.asarray(p, np.float64) + np.asarray(u, np.float64)
    # The params are rounded to their dtype once, as optax.apply_updates does.
    np.testing.assert_array_equal(np.asarray(np_), p64.astype(np.asarray(p).dtype))
    expected = decay * np.asarray(e, np.float64) + (1 - decay) * np.asarray(np_, np.float64)
    np.testing.assert_allclose(np.asarray(ne, np.float64), expected, rtol=2e-7, atol=1e-7)
    assert ne.dtype == jnp.float32


def test_fused_carries_integer_leaves_and_skips_masked_ones():
  params = {"w": jnp.array([1.0, 2.0]), "step": jnp.array(3, jnp.int32), "frozen": jnp.ones(2)}
  updates = {"w": jnp.array([1.0, 1.0]), "step": jnp.array(1, jnp.int32), "frozen": jnp.ones(2)}
  mask = {"w": True, "step": True, "frozen": False}
  tx = ema_jax.ema(0.5, mask=mask)
  state = tx.init(params)
  out_updates, state = tx.update(updates, state, params)
  expected_params = optax.apply_updates(params, out_updates)
  new_p, new_e = ema_jax.apply_updates_and_average(params, updates, tx.init(params).ema, 0.5)
  assert _bits(new_p) == _bits(expected_params)
  assert _bits(new_e) == _bits(state.ema)
  assert new_e["frozen"] is None and int(new_e["step"]) == 4
  np.testing.assert_array_equal(new_e["w"], [1.5, 2.5])


@pytest.mark.parametrize("debias", [False, True])
def test_fused_refuses_an_ema_state_whatever_its_options(debias):
  # Plain trees only, like optax.incremental_update: an EMA state is updated
  # by its transformation, which honours its options.
  params = {"w": jnp.array([0.0, 4.0])}
  state = ema_jax.ema(0.5, debias=debias).init(params)
  _, swapped = ema_jax.swap(params, state)
  chained = optax.chain(optax.sgd(0.1), ema_jax.ema(0.5)).init(params)
  for ema in (state, swapped, chained):
    with pytest.raises(TypeError, match="tx.update"):
      ema_jax.apply_updates_and_average(params, None, ema, 0.5)


def test_fused_without_updates_only_moves_the_average():
  params = {"w": jnp.array([2.0])}
  new_p, new_e = ema_jax.apply_updates_and_average(params, None, {"w": jnp.array([0.0])}, 0.25)
  assert new_p["w"] is params["w"]
  np.testing.assert_array_equal(new_e["w"], [1.5])


def test_fused_decay_may_be_a_traced_schedule_value():
  schedule = ema_jax.warmup_decay(0.999)

  @jax.jit
  def step(params, ema, updates, count):
    return ema_jax.apply_updates_and_average(params, updates, ema, schedule(count))

  params, ema = {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}
  _, new_e = step(params, ema, {"w": jnp.zeros(2)}, jnp.asarray(10, jnp.int32))
  d = float(schedule(jnp.asarray(10, jnp.int32)))
  np.testing.assert_allclose(new_e["w"], [1 - d, 1 - d], rtol=1e-6)


def test_fused_errors_name_the_problem():
  params = {"a": {"b": jnp.ones(3)}}
  with pytest.raises(ValueError, match="`decay` must be in"):
    ema_jax.apply_updates_and_average(params, None, params, 1.5)
  with pytest.raises(ValueError, match="scalar"):
    ema_jax.apply_updates_and_average(params, None, params, jnp.ones(2))
  with pytest.raises(TypeError, match="bool"):
    ema_jax.apply_updates_and_average(params, None, params, True)
  with pytest.raises(ValueError, match=r"\['a'\]\['b'\].*shape"):
    ema_jax.apply_updates_and_average(params, None, {"a": {"b": jnp.ones(4)}}, 0.5)
  with pytest.raises(ValueError, match="structure"):
    ema_jax.apply_updates_and_average(params, None, {"c": jnp.ones(3)}, 0.5)
  with pytest.raises(TypeError, match="floating"):
    ema_jax.apply_updates_and_average(params, None, {"a": {"b": jnp.ones(3, jnp.int32)}}, 0.5)


# ---------------------------------------------------------------------------
# The benchmark


def test_benchmark_smoke_mode_runs(tmp_path):
  report, _ = run_smoke("run.py", tmp_path / "bench.json", timeout=300)
  machine = report["machine"]
  assert machine["cpu_count"] >= 1 and machine["cpu_model"]
  assert report["versions"]["jax"] == jax.__version__
  assert report["versions"]["optax"] == optax.__version__
  ours = "ema_jax ema().update (jit, donated)"
  groups = {(g["dtype"], g["leaves"]) for g in report["ema"]}
  assert groups == {("float32", 1), ("float32", 4), ("bfloat16", 1), ("bfloat16", 4)}
  for group in report["ema"]:
    case = next(c for c in group["cases"] if c["name"] == ours)
    assert case["median_s"] > 0 and len(case["samples_s"]) == report["settings"]["rounds"]
    assert case["gb_per_s"] == pytest.approx(case["bytes"] / case["median_s"] / 1e9)
    p_bytes = 4 if group["dtype"] == "float32" else 2
    assert case["bytes"] == group["n"] * (p_bytes + 8)
    names = [c["name"] for c in group["cases"]]
    assert any(n.startswith("(a)") for n in names) and any(n.startswith("(f)") for n in names)
  for group in report["step"]:
    cases = {c["name"]: c for c in group["cases"]}
    assert {"without EMA", "ema() in the chain", "apply_updates_and_average"} <= set(cases)
    assert all(x["temp_bytes"] < group["n"] for x in group["xla"].values())
  assert {g["optimizer"] for g in report["step"]} == {"sgd", "adam"}
  (tree,) = report["tree"]  # the standalone update on the LM's real tree
  base = "(b) optax.incremental_update (jit, donated)"
  assert tree["paired"][base] == {"median": 1.0, "p25": 1.0, "p75": 1.0}
  ratio = tree["paired"][ours]["median"]
  samples = {c["name"]: c["samples_s"] for c in tree["cases"] if "samples_s" in c}
  per_round = [a / b for a, b in zip(samples[ours], samples[base])]
  assert ratio == pytest.approx(statistics.median(per_round))  # paired, per round
  # Time to the first step: one fresh process per case and round.
  step, entry, calls = report["first"]
  assert set(step["cases"]) == set(first_step.STEP_CASES)
  assert set(entry["cases"]) == set(first_step.ENTRY_CASES)
  assert set(calls["cases"]) == set(first_step.CALL_CASES)
  for group in (step, entry, calls):
    for name, c in group["cases"].items():
      assert len(c["samples"]) == group["rounds"] == 1
      if group is calls:  # a whole first call, not trace and compile apart
        assert c["first_call_s"]["median"] > 0 and "compile_s" not in c
        totals = [s["first_call_s"] for s in c["samples"]]
      else:
        assert c["trace_lower_s"]["median"] > 0 and c["compile_s"]["median"] > 0
        totals = [s["trace_lower_s"] + s["compile_s"] for s in c["samples"]]
      if "base" in c:
        base_totals = [first_step.total_s(s) for s in group["cases"][c["base"]]["samples"]]
        assert c["ratio"]["median"] == pytest.approx(totals[0] / base_totals[0])
  assert all(calls["cases"][name]["base"] == first_step.FLOORS[name]
             for name in first_step.CALL_CASES if name in first_step.FLOORS)
  ours = step["cases"]["ema()"]
  assert ours["base"] == first_step.STEP_BASE and "overhead_vs_by_hand" in ours
  for case, same in first_step.SAME_BY_HAND.items():
    assert step["cases"][case]["same_by_hand"] == same
    c = step["cases"][case]  # at 3 leaves an overhead may be below 0: noise
    assert c["overhead_vs_same_by_hand"] == pytest.approx(
        c["overhead_s"]["median"] / step["cases"][same]["overhead_s"]["median"])
  bf16 = step["cases"]["ema()" + first_step.BF16]  # beside the bfloat16 step and by hand
  assert bf16["base"] == first_step.STEP_BASE + first_step.BF16 and "overhead_vs_by_hand" in bf16
  assert entry["cases"]["swap"]["base"] == first_step.SWAP_BASE


def test_fused_update_refuses_a_concrete_decay_outside_unit_interval():
  with pytest.raises(ValueError, match=r"`decay` must be in \[0, 1\]"):
    ema_jax.apply_updates_and_average(
        jnp.ones(2), jnp.ones(2), jnp.ones(2), jnp.float32(1.5)
    )


# A constant decay (start_step=0, update_every=1) compiles to what
# `optax.incremental_update` compiles to, plus the step count: the same bytes,
# one loop per leaf, no conditional, no per-element copy select. The timed
# comparison is benchmarks/run.py's `tree` section; this is its clock-free part.
_TREE = {  # a transformer's kinds of leaves: matrices, 3-D kernels, small vectors
    "embed": (512, 64), "pos": (32, 64), "scale": (64,), "bias": (256,),
    "qkv": (64, 4, 16), "head_bias": (4, 16), "mlp": (64, 256),
}


def _compiled(f, *args):
  return jax.jit(f, donate_argnums=0).lower(*args).compile()


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_constant_decay_compiles_to_incremental_update_plus_a_count(dtype):
  params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in _TREE.items()}
  tx = ema_jax.ema(0.999)
  nothing = jax.tree.map(lambda _: None, params)
  ours = _compiled(lambda s, p: tx.update(nothing, s, p)[1],
                   jax.eval_shape(tx.init, params), params)
  # ema_jax's default: a float32 average for float32 and bfloat16 params.
  average = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in _TREE.items()}
  theirs = _compiled(
      lambda s, p: optax.EmaState(
          optax.safe_increment(s.count),
          jax.tree.map(lambda e, x: optax.incremental_update(x.astype(e.dtype), e, 1e-3),
                       s.ema, p)),
      optax.EmaState(jax.ShapeDtypeStruct((), jnp.int32), average), params)
  hlo = ours.as_text()
  assert "conditional" not in hlo
  assert " select(" not in hlo.replace("s32[] select(", "")  # but the count's
  assert hlo.count(" fusion(") == theirs.as_text().count(" fusion(") <= len(_TREE) + 1
  assert _cost(ours)["bytes accessed"] == _cost(theirs)["bytes accessed"]



# Time to the first step: tracing, lowering and compiling grow with the
# lowered program, so its size per leaf is the clock-free part of
# benchmarks/run.py's `first` section (whose cases these are). Per leaf, the
# EMA may add what `optax.incremental_update` written by hand adds to an Adam
# step (a count and a float32 average), plus `per_leaf` more ops where the
# weight is traced or stacked (the select that makes weight 1 an exact copy),
# and SLACK ops in all whatever the number of leaves (the count, the
# schedule, one barrier). A barrier per leaf lowered to two conditionals per
# leaf and made the EMA's compile overhead ~2x the by-hand one at 1000 leaves.
SLACK = 160
_FEW, _MANY = 8, 40


def _added_ops(case: str, leaves: int, dtype: Any) -> tuple[int, str]:
  """What `case` adds to the lowered Adam step without an EMA, in ops."""
  text = first_step.lower(case, leaves, dtype).as_text()
  plain = first_step.lower(first_step.STEP_BASE, leaves, dtype).as_text()
  return first_step.count_ops(text) - first_step.count_ops(plain), text


@pytest.mark.standard_promotion  # optax is not strict-clean
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "case, per_leaf",
    [("ema()", 0), (first_step.SCHEDULE, 1), (first_step.MULTI, 1)],
    ids=["constant", "schedule_debias_every2", "multi"],
)
def test_lowered_update_grows_per_leaf_like_incremental_update(dtype, case, per_leaf):
  added = {}
  for leaves in (_FEW, _MANY):
    ours, text = _added_ops(case, leaves, dtype)
    hand, _ = _added_ops(first_step.BY_HAND, leaves, dtype)
    added[leaves] = (ours, hand)
    assert ours <= hand + per_leaf * leaves + SLACK, (leaves, ours, hand)
    # One barrier for all leaves (two conditionals); with update_every, the
    # cond that skips the average and the one that skips the schedule.
    assert text.count("stablehlo.case") <= 4
  growth = added[_MANY][0] - added[_FEW][0]
  hand_growth = added[_MANY][1] - added[_FEW][1]
  assert growth <= hand_growth + per_leaf * (_MANY - _FEW), added


def test_update_every_evaluates_the_schedule_on_averaging_updates_only():
  # With update_every=k an averaging update uses the schedule's product over
  # its k steps. The updates in between must not compute it: at k = 1e8 it
  # took seconds an update. A callback in the schedule records the steps it is
  # evaluated at.
  evaluated: list[int] = []
  armed = []  # not while `ema` checks the schedule (3000 probes, one call each)

  def decay(count):
    if armed:
      jax.debug.callback(lambda c: evaluated.append(int(c)), count)
    return jnp.full(jnp.shape(count), 0.9, jnp.float32)

  tx = ema_jax.ema(decay, update_every=4)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  update = jax.jit(lambda s, p: tx.update(p, s, p)[1])
  armed.append(True)
  for n in range(1, 13):
    evaluated.clear()
    state = jax.block_until_ready(update(state, params))
    if n % 4 == 0:  # averages, over steps n - 4 .. n - 1
      assert sorted(evaluated) == list(range(n - 4, n)), n
    else:  # at most the one step's decay, never the product
      assert len(evaluated) <= 1, (n, evaluated)


def test_synthesized_sum_traces_a_constant_number_of_ops_per_leaf():
  # `synthesize` adds up each snapshot with one jitted program over every
  # leaf: per leaf a broadcast product and one sum over the stacked averages
  # (5 ops), whatever their number (indexing each average took 13 for 2, 55 for 8).
  from ema_jax import posthoc

  def ops(averages: int, leaves: int) -> int:
    stacks = [jax.ShapeDtypeStruct((averages, 4), jnp.float32)] * leaves
    w = jax.ShapeDtypeStruct((averages,), jnp.float32)
    return first_step.count_ops(posthoc._combine.lower(stacks, w).as_text())

  for averages in (1, 2, 8):
    assert ops(averages, 20) - ops(averages, 10) == 10 * 5, averages


def test_jitted_swap_lowers_to_its_output_trees_by_hand():
  # `swap` computes nothing: jitted, it is the rearrangement written by hand
  # (its first-step floor in benchmarks/first_step.py), op for op.
  by_hand = first_step.lower(first_step.SWAP_BASE, 10).as_text()
  ours = first_step.lower("swap", 10).as_text()
  assert first_step.count_ops(ours) == first_step.count_ops(by_hand) == 1  # the count's reshape


@pytest.mark.standard_promotion  # optax is not strict-clean
@pytest.mark.parametrize("tx", [
    ema_jax.ema(0.9), ema_jax.multi_ema([0.9, 0.99], debias=True),
    ema_jax.ema(0.9, ema_dtype=jnp.bfloat16, rounding="stochastic", key=0),
    ema_jax.presets.keras(0.9, ema_overwrite_frequency=2), ema_jax.bema(update_freq=1),
], ids=["ema", "multi", "stochastic", "keras", "bema"])
def test_tracing_never_asks_a_tracer_for_its_sharding(monkeypatch, tx):
  # A tracer's `.sharding` raises, with a message JAX builds by walking the
  # whole jaxpr traced so far: asked once per leaf, tracing grew with the
  # square of the leaves (multi_ema's jitted init: 3 s at 1000 leaves, over
  # 10 minutes at 10,000). Every jitted entry point is traced with the
  # attribute recording each time it is asked.
  asked = []

  def sharding(self):
    asked.append(type(self).__name__)
    raise AttributeError("sharding")

  monkeypatch.setattr(jax.core.Tracer, "sharding", property(sharding))
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3), "n": jnp.int32(1)}
  state = jax.jit(tx.init)(params)
  state = jax.jit(lambda s, p: tx.update(p, s, p)[1])(state, params)
  kw = {"index": 1} if isinstance(state, ema_jax.MultiEmaState) else {}
  jax.jit(lambda p, s: ema_jax.swap(p, s, **kw))(params, state)
  jax.jit(lambda p, s: ema_jax.blend(p, s, 0.5, **kw))(params, state)
  jax.jit(lambda p, s: ema_jax.reset(s, p))(params, state)
  jax.jit(lambda s: ema_jax.ema_params(s, **kw))(state)
  assert not asked
