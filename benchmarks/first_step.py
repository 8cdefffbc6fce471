"""Time to the first step: tracing, lowering and compiling, in a fresh process.

`benchmarks/run.py --sections first` runs this file once per sample, as a
new process (a jitted function's caches would otherwise make every sample
after the first free), in interleaved rounds (`harness.fresh_rounds`). One
sample builds a case over `leaves` float32 leaves of 64x64 (abstract: no
array is allocated) and prints its times as one JSON line:

  trace_lower_s  `jax.jit(f).trace(...)` then `.lower()`: Python and StableHLO
  compile_s      `.compile()`: XLA
  ops            the lowered module's StableHLO operations, a clock-free size

Cases, by group:
  step   an Adam train step (jitted, params and optimizer state donated)
         without an EMA, with `ema()` last in the chain (and its options),
         with `optax.incremental_update` written by hand over the same state
         (a count and a float32 average); the options (a warm-up schedule,
         `debias`, `update_every=2`) and `multi_ema` of two decays, each
         beside the same arithmetic written by hand; the first three again
         over bfloat16 params (the average float32); and Flax's `nnx.EMA`
         beside the same NNX step without it.
  entry  the jitted entry points `swap`, `ema_params`, `blend`, `reset` over
         an `ema()` state, beside their floor: a jitted identity over the same
         trees (`reset`'s floor also copies the params into the average's
         place; `blend`'s is the same arithmetic written with `jax.tree.map`;
         `swap`'s returns its output trees, rearranged by hand: the swapped
         state holds the raw params beside the average, one tree more).
  calls  entry points that read files or run eagerly, timed as one whole
         first call (`first_call_s`: everything from the call to its results
         ready, tracing and compiling included) beside their floor, over
         `leaves` float32 leaves of 8x8 (small in bytes: the files are
         written once per run by `--setup`, untimed):
         `ema_jax.flax.restore_checkpoint` of an Adam + `ema()` Linen
         `TrainState` into an abstract template, beside plain Orbax
         (`CheckpointManager.restore` with `StandardRestore` of the same
         template); `ema_jax.posthoc.synthesize` from two snapshots of two
         widths, beside one pass over them (each read with plain Orbax, then a
         jitted weighted sum written by hand); `SwapEMAWeights` swapping the
         EMA in and back out (`on_test_begin`, `on_test_end`) of a Linen
         `TrainState`, beside a jitted identity over (params, opt_state)
         called twice, and of an NNX model and optimizer, beside `nnx.split`,
         a jitted identity and `nnx.update`, twice.

Run alone: `python benchmarks/first_step.py CASE LEAVES [DIR]`, after
`python benchmarks/first_step.py --setup DIR LEAVES` for the `calls` group.

What docs/benchmarks.md's run of the step group found beyond the page
(2-core Intel Xeon VM, 23.5 GiB, jax 0.10.2, flax 0.12.8; trace + lower, then
compile, at 1000 leaves, medians of 3 fresh processes):

  times       without EMA 1.16 s + 3.10 s; by hand 1.34 + 4.72; `ema()` 1.44 +
              4.50; the options 1.46 + 5.72, by hand 1.58 + 5.28; `multi_ema`
              1.44 + 5.29, two by hand 1.68 + 6.09; bfloat16: without EMA
              1.18 + 6.03, by hand 1.59 + 8.88, `ema()` 1.53 + 8.02.
  10,000      one round: without EMA 13.3 s + 187 s; `ema()` adds 114.2 s, by
              hand 117.6 s; the options 117.6 s, by hand 132.2 s. Two averages
              by hand and the bfloat16 step by hand were killed out of memory
              (24.4 GB resident), so `MAX_LEAVES` keeps them, and the cases
              judged against them, to 1000 leaves.
  ops         lowered ops a case adds per leaf (8 and 40 leaves): `ema()` 5,
              by hand 7; the options 6, by hand 8; `multi_ema` of two 7, two
              by hand 14. tests/test_performance.py holds them.
  options     with a schedule or `debias` the weight is a run-time scalar, and
              XLA:CPU fuses its arithmetic (the clip, the compare that makes a
              weight of 1 an exact copy) into every leaf's loop, with the
              select. Patched out for a measurement, the select was 0.4 s of
              the compile at 1000 leaves and the clip 0.1 s. An
              `optimization_barrier` does not keep them out: XLA:CPU expands
              it before it fuses.
  nnx.EMA     Flax's `nnx.EMA` traced in 0.72 s at 100 leaves and 105 s at
              1000 (its NNX step alone: 0.20 s and 1.48 s).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import ema_jax  # noqa: E402

SHAPE = (64, 64)
DECAY = 0.999

STEP_BASE = "without EMA"
BY_HAND = "by hand: optax.incremental_update + a count"
SCHEDULE = "ema(warmup_decay, debias, update_every=2)"
BY_HAND_SCHEDULE = "by hand: the same warm-up, debias and every 2"
MULTI_DECAYS = (DECAY, 0.9999)
MULTI = "multi_ema((0.999, 0.9999))"
BY_HAND_TWO = "by hand: two incremental_updates"
# The suffix of a step case over bfloat16 params (a float32 average).
BF16 = ", bfloat16 params"
NNX_BASE = "nnx: without EMA"
ENTRY_BASE = "floor: jitted identity over (params, state)"
SWAP_BASE = "floor: jitted, swap's output trees by hand"
RESET_BASE = "floor: jitted identity, params copied into the state"
BLEND_BASE = "floor: alpha * ema + (1 - alpha) * params by hand"


def params_like(leaves: int, dtype: Any = jnp.float32) -> dict[str, Any]:
  return {f"w{i:05d}": jax.ShapeDtypeStruct(SHAPE, dtype) for i in range(leaves)}


Built = tuple[Callable[..., Any], tuple[Any, ...], tuple[int, ...]]


def _chain(tx: optax.GradientTransformation, params: Any) -> Built:
  def step(params: Any, state: Any, grads: Any) -> Any:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step, (params, jax.eval_shape(tx.init, params), params), (0, 1)


def _adam_then(params: Any, ema: Any, update_ema: Callable[[Any, Any], Any]) -> Built:
  """An Adam step, then `update_ema(new_params, ema)`: an EMA written by hand."""
  adam = optax.adam(1e-3)

  def step(params: Any, state: Any, grads: Any) -> Any:
    opt_state, ema = state
    updates, opt_state = adam.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, (opt_state, update_ema(params, ema))

  return step, (params, (jax.eval_shape(adam.init, params), ema), params), (0, 1)


def _float32_like(params: Any) -> Any:
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)


_COUNT = jax.ShapeDtypeStruct((), jnp.int32)


def _by_hand(params: Any) -> Built:
  # What a user writes without a library: optax.ema's state (a float32
  # average, as ema_jax keeps for bfloat16 params), the average updated from
  # the step's new params.
  def update_ema(params: Any, ema: Any) -> Any:
    new = jax.tree.map(lambda p, e: optax.incremental_update(p.astype(e.dtype), e, 1 - DECAY),
                       params, ema.ema)
    return optax.EmaState(optax.safe_increment(ema.count), new)

  return _adam_then(params, optax.EmaState(_COUNT, _float32_like(params)), update_ema)


def _by_hand_schedule(params: Any) -> Built:
  # `ema(warmup_decay(DECAY), debias=True, update_every=2)` as a user writes
  # it without a library: the warm-up decay, its product over the two steps
  # an update stands for, the debiasing normaliser, and a cond that averages
  # on every second step.
  def keep(t: jax.Array) -> jax.Array:  # the warm-up decay at step t
    return jnp.minimum(1.0 - (1.0 + t.astype(jnp.float32)) ** (-2.0 / 3.0), DECAY)

  def update_ema(params: Any, state: Any) -> Any:
    count, ema, norm = state

    def average(ema: Any, norm: jax.Array) -> Any:
      w = 1.0 - keep(jnp.maximum(count - 1, 0)) * keep(count)
      norm = norm + w * (1.0 - norm)
      return jax.tree.map(lambda p, e: optax.incremental_update(p, e, w / norm),
                          params, ema), norm

    ema, norm = jax.lax.cond(count % 2 == 1, average, lambda e, n: (e, n), ema, norm)
    return optax.safe_increment(count), ema, norm

  ema = (_COUNT, _float32_like(params), jax.ShapeDtypeStruct((), jnp.float32))
  return _adam_then(params, ema, update_ema)


def _by_hand_two(params: Any) -> Built:
  # Two averages as a user writes them without `multi_ema`: two
  # `incremental_update`s of each leaf, one per decay.
  def update_ema(params: Any, state: Any) -> Any:
    count, emas = state
    emas = tuple(jax.tree.map(lambda p, e: optax.incremental_update(p, e, 1 - d), params, e)
                 for d, e in zip(MULTI_DECAYS, emas))
    return optax.safe_increment(count), emas

  average = _float32_like(params)
  return _adam_then(params, (_COUNT, (average, average)), update_ema)


def _nnx(params: Any, with_ema: bool) -> Built:
  from flax import nnx

  class Holder(nnx.Module):
    def __init__(self, leaves: list[Any]):
      self.ws = nnx.List([nnx.Param(jnp.zeros(x.shape, x.dtype)) for x in leaves])

  def build() -> Any:
    model = Holder(list(params.values()))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    return (model, opt, nnx.EMA(model, decay=DECAY)) if with_ema else (model, opt)

  graphdef, state = nnx.split(nnx.eval_shape(build))

  # NNX's functional form (merge, update, split): what `nnx.jit` traces.
  def step(state: Any, grads: Any) -> Any:
    objs = nnx.merge(graphdef, state)
    model, opt = objs[0], objs[1]
    opt.update(model, grads)
    if with_ema:
      objs[2].update(model)
    return nnx.state(objs)

  grads = nnx.state(nnx.eval_shape(lambda: Holder(list(params.values()))), nnx.Param)
  return step, (state, grads), (0,)


def _entry(name: str, params: Any) -> Built:
  tx = optax.chain(optax.adam(1e-3), ema_jax.ema(DECAY))
  state = jax.eval_shape(tx.init, params)
  fns: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
      ENTRY_BASE: (lambda p, s: (p, s), (params, state)),
      RESET_BASE: (
          lambda p, s: (s[0], ema_jax.EmaState(
              s[1].count, jax.tree.map(jnp.copy, p), None, None)),
          (params, state)),
      BLEND_BASE: (
          lambda p, s: jax.tree.map(lambda e, x: 0.5 * e + 0.5 * x, s[1].ema, p),
          (params, state)),
      # What `swap` returns, rearranged by hand: one tree more than it takes
      # (the raw params beside the average) and the average twice.
      SWAP_BASE: (
          lambda p, s: (s[1].ema, (s[0], ema_jax.SwappedEmaState(
              s[1].count.reshape(1), s[1].ema, p, None, None))),
          (params, state)),
      "swap": (ema_jax.swap, (params, state)),
      "ema_params": (lambda s: ema_jax.ema_params(s), (state,)),
      "blend": (lambda p, s: ema_jax.blend(p, s, 0.5), (params, state)),
      "reset": (lambda p, s: ema_jax.reset(s, p), (params, state)),
  }
  f, args = fns[name]
  return f, args, ()

# --------------------------------------------------------------------------
# Whole first calls (the `calls` group), over small leaves.

CALL_SHAPE = (8, 8)
RESTORE_BASE = "floor: plain Orbax StandardRestore"
SYNTH_BASE = "floor: plain Orbax reads + a jitted weighted sum"
HOOK_BASE = "floor: jitted identity over (params, opt_state), twice"
NNX_HOOK_BASE = "floor: nnx.split, jitted identity, nnx.update, twice"
RESTORE = "restore_checkpoint"
SYNTH = "synthesize (2 snapshots)"
HOOK = "SwapEMAWeights in + out (Linen)"
NNX_HOOK = "SwapEMAWeights in + out (NNX)"
SNAPSHOT_EVERY = 1
# The weights of the floor's sum: any fixed numbers (the floor does not solve).
SYNTH_WEIGHTS = (0.1, 0.2, 0.3, 0.4)


def _small(leaves: int) -> dict[str, Any]:
  return {f"w{i:05d}": jnp.zeros(CALL_SHAPE, jnp.float32) for i in range(leaves)}


def _linen_state(leaves: int) -> Any:
  from flax.training.train_state import TrainState

  tx = optax.chain(optax.adam(1e-3), ema_jax.ema(DECAY))
  # Eagerly, as users build it (jitted, compiling it at 10,000 leaves takes
  # 13 GB of memory).
  return TrainState.create(apply_fn=None, params=_small(leaves), tx=tx)


def _nnx_pair(leaves: int) -> Any:
  from flax import nnx

  class Holder(nnx.Module):
    def __init__(self) -> None:
      self.ws = nnx.List([nnx.Param(jnp.zeros(CALL_SHAPE)) for _ in range(leaves)])

  tx = optax.chain(optax.adam(1e-3), ema_jax.ema(DECAY))
  model = Holder()
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def setup(directory: str, leaves: int) -> None:
  """Write the checkpoint and the two snapshots the `calls` group reads."""
  import orbax.checkpoint as ocp
  import ema_jax.flax

  state = _linen_state(leaves)
  with ocp.CheckpointManager(os.path.join(directory, "checkpoint")) as manager:
    ema_jax.flax.save_checkpoint(manager, 1, state)
    manager.wait_until_finished()
  snaps = ema_jax.posthoc.Snapshotter(os.path.join(directory, "snapshots"),
                                      every=SNAPSHOT_EVERY)
  tx = snaps.ema()
  params = _small(leaves)
  # Eagerly: jitting this `multi_ema`'s init or update at 10,000 leaves took
  # over 10 minutes and 14 GB of memory (jax 0.10.2, 2-core VM).
  opt_state = tx.init(params)
  with snaps:
    for _ in range(2):
      opt_state = tx.update(params, opt_state, params)[1]
      snaps.maybe_save(opt_state)


def _abstract_state(leaves: int) -> Any:
  from flax.training.train_state import TrainState

  tx = optax.chain(optax.adam(1e-3), ema_jax.ema(DECAY))
  return jax.eval_shape(lambda: TrainState.create(apply_fn=None, params=_small(leaves), tx=tx))


def _restore(case: str, directory: str, leaves: int) -> Callable[[], Any]:
  import orbax.checkpoint as ocp
  import ema_jax.flax

  template = _abstract_state(leaves)
  path = os.path.join(directory, "checkpoint")

  def ours() -> Any:
    with ocp.CheckpointManager(path) as manager:
      return ema_jax.flax.restore_checkpoint(manager, template)

  def plain() -> Any:
    with ocp.CheckpointManager(path) as manager:
      return manager.restore(1, args=ocp.args.StandardRestore(template))

  return ours if case == RESTORE else plain


def _synthesize(case: str, directory: str, leaves: int) -> Callable[[], Any]:
  import orbax.checkpoint as ocp

  path = os.path.join(directory, "snapshots")
  like = jax.eval_shape(lambda: _small(leaves))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  stacked = {k: jax.ShapeDtypeStruct((2, *CALL_SHAPE), jnp.float32, sharding=device)
             for k in like}

  def ours() -> Any:
    return ema_jax.posthoc.synthesize(path, 0.2, like=like)

  @jax.jit
  def weighted(a: Any, b: Any) -> Any:
    w = SYNTH_WEIGHTS
    return jax.tree.map(lambda x, y: w[0] * x[0] + w[1] * x[1] + w[2] * y[0] + w[3] * y[1],
                        a, b)

  def plain() -> Any:
    with ocp.CheckpointManager(path) as manager:
      read = [manager.restore(step, args=ocp.args.Composite(
                  ema=ocp.args.StandardRestore({"ema": stacked}))).ema["ema"]
              for step in sorted(manager.all_steps())]
    return weighted(*read)

  return ours if case == SYNTH else plain


def _hook(case: str, leaves: int) -> tuple[Callable[[], Any], Any]:
  import ema_jax.flax

  hook = ema_jax.flax.SwapEMAWeights()
  if case in (HOOK, HOOK_BASE):
    state = _linen_state(leaves)
    identity = jax.jit(lambda p, s: (p, s))

    def ours() -> Any:
      return hook.on_test_end(hook.on_test_begin(state))

    def plain() -> Any:
      params, opt_state = identity(*identity(state.params, state.opt_state))
      return state.replace(params=params, opt_state=opt_state)

    return (ours if case == HOOK else plain), state
  from flax import nnx

  model, optimizer = _nnx_pair(leaves)
  identity = jax.jit(lambda s: s)

  def ours_nnx() -> Any:
    hook.on_test_begin(model, optimizer)
    hook.on_test_end(model, optimizer)
    return nnx.state((model, optimizer))

  def plain_nnx() -> Any:
    for _ in range(2):
      _, state = nnx.split((model, optimizer))
      nnx.update((model, optimizer), identity(state))
    return nnx.state((model, optimizer))

  return (ours_nnx if case == NNX_HOOK else plain_nnx), None


def measure_call(case: str, leaves: int, directory: str) -> dict[str, Any]:
  """One whole first call of `case` (files read, traced, compiled, run)."""
  t0 = time.perf_counter()
  if case in (RESTORE, RESTORE_BASE):
    f = _restore(case, directory, leaves)
  elif case in (SYNTH, SYNTH_BASE):
    f = _synthesize(case, directory, leaves)
  else:
    f, _ = _hook(case, leaves)
  t1 = time.perf_counter()
  jax.block_until_ready(f())
  t2 = time.perf_counter()
  return {"build_s": t1 - t0, "first_call_s": t2 - t1}


def build(case: str, leaves: int, dtype: Any = jnp.float32) -> Built:
  """`(f, args, donate_argnums)` of `case` over `leaves` leaves of `dtype`
  (bfloat16 for a case named with `BF16`)."""
  if case.endswith(BF16):
    case, dtype = case[: -len(BF16)], jnp.bfloat16
  params = params_like(leaves, dtype)
  adam = optax.adam(1e-3)
  if case == STEP_BASE:
    return _chain(adam, params)
  if case == "ema()":
    return _chain(optax.chain(adam, ema_jax.ema(DECAY)), params)
  if case == SCHEDULE:
    ema = ema_jax.ema(ema_jax.warmup_decay(DECAY), debias=True, update_every=2)
    return _chain(optax.chain(adam, ema), params)
  if case == MULTI:
    return _chain(optax.chain(adam, ema_jax.multi_ema(MULTI_DECAYS)), params)
  if case == BY_HAND:
    return _by_hand(params)
  if case == BY_HAND_SCHEDULE:
    return _by_hand_schedule(params)
  if case == BY_HAND_TWO:
    return _by_hand_two(params)
  if case in (NNX_BASE, "nnx.EMA"):
    return _nnx(params, case == "nnx.EMA")
  return _entry(case, params)


STEP_CASES = (STEP_BASE, BY_HAND, "ema()", SCHEDULE, BY_HAND_SCHEDULE, MULTI, BY_HAND_TWO,
              STEP_BASE + BF16, BY_HAND + BF16, "ema()" + BF16, NNX_BASE, "nnx.EMA")
# A step case with more arithmetic than one average -> by hand, the same arithmetic.
SAME_BY_HAND = {SCHEDULE: BY_HAND_SCHEDULE, MULTI: BY_HAND_TWO}
# Cases `make bench` runs only up to a number of leaves, and why (2-core VM,
# 23.5 GiB, flax 0.12.8).
_NNX_EMA = "tracing nnx.EMA grows faster than its leaves (105 s at 1000)"
_OOM = "compiling {} at 10,000 leaves ran out of 23.5 GiB"
MAX_LEAVES = {NNX_BASE: (1000, _NNX_EMA), "nnx.EMA": (1000, _NNX_EMA),
              **{c: (1000, _OOM.format("two averages by hand")) for c in (MULTI, BY_HAND_TWO)},
              **{c + BF16: (1000, _OOM.format("the bfloat16 step by hand"))
                 for c in (STEP_BASE, BY_HAND, "ema()")}}
ENTRY_CASES = (ENTRY_BASE, SWAP_BASE, "swap", "ema_params", BLEND_BASE, "blend", RESET_BASE, "reset")
CALL_CASES = (RESTORE_BASE, RESTORE, SYNTH_BASE, SYNTH, HOOK_BASE, HOOK, NNX_HOOK_BASE,
              NNX_HOOK)


def step_bases(case: str) -> tuple[str, str]:
  """A step case's baselines: the step without an EMA, and by hand, over
  params of the case's dtype."""
  suffix = BF16 if case.endswith(BF16) else ""
  return STEP_BASE + suffix, BY_HAND + suffix


# case -> the case whose time it is judged against
FLOORS = {"reset": RESET_BASE, "swap": SWAP_BASE, "ema_params": ENTRY_BASE,
          "blend": BLEND_BASE, RESTORE: RESTORE_BASE, SYNTH: SYNTH_BASE, HOOK: HOOK_BASE,
          NNX_HOOK: NNX_HOOK_BASE}


def total_s(sample: dict[str, Any]) -> float:
  """A sample's time to the first step: its whole first call, or trace + compile."""
  if "first_call_s" in sample:
    return float(sample["first_call_s"])
  return float(sample["trace_lower_s"] + sample["compile_s"])


def count_ops(text: str) -> int:
  """StableHLO operations in a lowered module's text (`stablehlo.x`, calls)."""
  return sum(line.count("stablehlo.") + line.count(" call @") for line in text.splitlines()
             if "=" in line or "stablehlo.return" in line)


def lower(case: str, leaves: int, dtype: Any = jnp.float32) -> Any:
  f, args, donate = build(case, leaves, dtype)
  return jax.jit(f, donate_argnums=donate).trace(*args).lower()


def measure(case: str, leaves: int) -> dict[str, Any]:
  t0 = time.perf_counter()
  f, args, donate = build(case, leaves)
  t1 = time.perf_counter()
  lowered = jax.jit(f, donate_argnums=donate).trace(*args).lower()
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  return {"build_s": t1 - t0, "trace_lower_s": t2 - t1, "compile_s": t3 - t2,
          "ops": count_ops(lowered.as_text())}


if __name__ == "__main__":
  if sys.argv[1] == "--setup":
    setup(sys.argv[2], int(sys.argv[3]))
  elif sys.argv[1] in CALL_CASES:
    directory = sys.argv[3] if len(sys.argv) > 3 else tempfile.mkdtemp()
    if len(sys.argv) <= 3:
      setup(directory, int(sys.argv[2]))
    print(json.dumps(measure_call(sys.argv[1], int(sys.argv[2]), directory)))
  else:
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
