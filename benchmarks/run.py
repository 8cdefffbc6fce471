"""The cost of an EMA update, beside the libraries people would otherwise use.

Run with `make bench` (full) or `make bench-smoke` (tiny sizes, a few seconds).
Every comparison runs in this one process, in interleaved rounds (each round
runs every case of a group once, in a new random order, each sample after one
untimed call), and reports the median over rounds. GB/s counts the bytes a case must move at the least (read the
params and the average, write the average), not what it happens to move, so a
case that moves more shows a lower figure.

Sections:
  ema      the standalone EMA update for float32 params, and for bfloat16
           params with a float32 average, one leaf and 200 leaves.
  step     a jitted train step (SGD, Adam) with the EMA over the step alone,
           beside the byte-count floor and the bytes XLA's program moves.
  memory   XLA's memory analysis of the donated steps: EMA-sized temporaries.
  tree     the standalone update on a real tree (the transformer LM of
           benchmarks/models.py: 70 leaves, median 128 elements) beside
           `optax.incremental_update`, with the ratio paired within rounds.
  first    time to the first step (trace + lower, and compile) for 10 to
           10,000 leaves, each sample a fresh process (benchmarks/first_step.py):
           the EMA's overhead over a step without it beside `incremental_update`
           by hand's and `nnx.EMA`'s, the jitted entry points beside a
           jitted identity over the same trees, and the whole first call of
           `restore_checkpoint`, `synthesize` and the Flax hook beside plain
           Orbax, one pass over the snapshots and a jitted identity. Ratios
           paired within rounds.

The table goes to stdout; the JSON (every sample, machine, versions, XLA's
bytes and temporaries per step) to benchmarks/results/ (git-ignored) or
`--out`; `--sizes 1e5,1e6`, `--rounds` and `--sections ema,step` narrow the
run, and `python benchmarks/report.py <json>` renders its tables. Comparators
that are absent (torch is optional) or need more than 60% of the free memory
are skipped and say so. `--peak-gbs` (the card's GB/s) adds the fraction of
peak on a GPU; `benchmarks/gpu.sh` runs every GPU figure.

What docs/benchmarks.md's runs (2-core AMD EPYC VM, CPU) found beyond the
page:

  compiled    A constant decay with `start_step=0`, `update_every=1` and no
              `debias` compiles to `optax.incremental_update`'s loop plus the
              step count: the same loops and bytes, no `lax.cond`, no select
              (tests/test_performance.py checks it). On the LM's tree (`tree`,
              200 rounds) ema_jax measured 1.07x `incremental_update` paired,
              the count-carrying `incremental_update` also 1.07x, the plain
              kernel in ema_jax's form `e + w (p - e)` 1.00x; five earlier
              runs gave 1.03-1.12x. So "no slower than incremental_update"
              holds for the program, not demonstrably in time on 2 shared
              cores: a step count costs one more array in and out.
  small       The update on a real tree is dominated by per-array costs: the
  leaves      LM's 70 leaves take 242 us, its 929,024 elements as one leaf
              86 us (about 2.3 us per leaf). Grouping the leaves below 4,096
              elements into one buffer measured 1.02x; one flat float32
              buffer for the whole average 0.95x, 10-20x slower at 1e7 with
              200 leaves, and it would break `swap` without copies,
              checkpoints by leaf name and per-leaf sharding: not shipped.
              torch's `_foreach_lerp_` does the tree in 103 us.
  200 leaves  at 1e5-1e6 elements: 382 us and 430 us against torch foreach's
              101 us and 216 us (the goal of 2x the per-leaf baseline: not
              met on XLA:CPU).
  steps       SGD with `ema()` 1.94-2.07x the step without (floor 1.67x):
              XLA:CPU has no multi-output fusion, so the EMA loop reads the
              new params back (XLA's byte count: 2.00x), and
              `apply_updates_and_average` compiles to the same two loops.
              Adam 1.29-1.32x at 1e8 (floor 1.29x), 1.36-1.53x at 1e7.
              bfloat16 params: SGD 1.94-2.54x (floor 2.33x), Adam 1.12-1.20x
              (floor 1.57x). At most 5,124 bytes of temporaries in any step.
  traps       Two XLA:CPU traps are avoided, each checked by a test: with
              bfloat16 params a donated step folded `params + updates` into
              the EMA loop and copied the params (an optimization barrier on
              the new params, CPU only, removes it; without it: up to 10.9x
              at 1e8); `update_every=k` computed the new params inside the
              `lax.cond`, keeping two EMA-sized temporaries (an SGD step at
              1e7 with `update_every=2`: 29.3 ms, now 2.9 ms).
  dtypes      nnx.EMA and Keras keep a bfloat16 average of bfloat16 params
              (it stops moving at decay 0.999); torch's `_foreach_lerp_`
              needs equal dtypes, so it converts bfloat16 params to float32
              first, as timm does.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ema_jax  # noqa: E402
from ema_jax import _engine  # noqa: E402
import first_step  # noqa: E402
from harness import (  # noqa: E402
    Case, finish, fresh_rounds, paired_ratios, quartiles, run_group, start, summary, threaded,
)
from harness import fmt_time as _fmt_time  # noqa: E402

DECAY = 0.999
EVERY = 4  # update_every in the train-step section
MANY_LEAVES = 200
FULL_SIZES = (10**5, 10**6, 10**7, 10**8)
SMOKE_SIZES = (10**3,)


# --------------------------------------------------------------------------
# The data


def _leaf_sizes(n: int, leaves: int) -> list[int]:
  base, extra = divmod(n, leaves)
  return [base + (i < extra) for i in range(leaves)]


def make_params(n: int, leaves: int, dtype: Any, seed: int = 0) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.PRNGKey(seed), leaves)
  return {
      f"layer{i:03d}": jax.random.normal(k, (s,), jnp.float32).astype(dtype)
      for i, (k, s) in enumerate(zip(keys, _leaf_sizes(n, leaves)))
  }


def _f32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), tree)


def _flat32(leaves: Any) -> jax.Array:
  """Every leaf, as float32, in one flat buffer."""
  return jnp.concatenate([x.astype(jnp.float32).ravel() for x in leaves])


def _copy(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# --------------------------------------------------------------------------
# Section 1: the standalone EMA update


def _ema_cases(
    params: dict[str, jax.Array], n: int, leaves: int
) -> list[Case]:
  """Every comparator for `ema <- d * ema + (1 - d) * params`."""
  d = DECAY
  p_bytes = jnp.dtype(next(iter(params.values())).dtype).itemsize
  # The least traffic: read the params and the float32 average, write the average.
  nbytes = n * (p_bytes + 2 * 4)
  mixed = p_bytes < 4
  cases: list[Case] = []
  state_fp = n * 4 * 1.0

  def ema_jax_update() -> Callable[[], Any]:
    tx = ema_jax.ema(d)
    no_updates = jax.tree.map(lambda _: None, params)
    # `None` updates: the params are already updated, only the average moves.
    step = jax.jit(lambda s, p: tx.update(no_updates, s, p)[1], donate_argnums=0)
    return threaded(step, tx.init(params), params)

  cases.append(
      Case("ema_jax ema().update (jit, donated)", ema_jax_update, nbytes,
           footprint=state_fp)
  )

  def plain_kernel() -> Callable[[], Any]:
    def kernel(e: Any, p: Any) -> Any:
      return jax.tree.map(
          lambda e, p: d * e + (1 - d) * p.astype(e.dtype), e, p
      )

    return threaded(jax.jit(kernel, donate_argnums=0), _f32(params), params)

  cases.append(
      Case("(a) plain elementwise kernel (jit, donated)", plain_kernel, nbytes,
           note="the practical limit", footprint=state_fp)
  )

  for donate in (True, False):

    def incremental(donate: bool = donate) -> Callable[[], Any]:
      step = jax.jit(
          lambda e, p: optax.incremental_update(p, e, 1 - d),
          donate_argnums=0 if donate else (),
      )
      return threaded(step, _f32(params), params)

    cases.append(
        Case(
            f"(b) optax.incremental_update (jit, {'donated' if donate else 'not donated'})",
            incremental, nbytes, footprint=state_fp * (1 if donate else 2),
        )
    )

  def eager_tree_map() -> Callable[[], Any]:
    def update(e: Any, p: Any) -> Any:
      return jax.tree.map(lambda e, p: d * e + (1 - d) * p, e, p)

    return threaded(update, _f32(params), params)

  cases.append(
      Case("(c) jax.tree.map, not jitted", eager_tree_map, nbytes,
           footprint=state_fp * 3)
  )

  def nnx_ema() -> Callable[[], Any]:
    from flax import nnx

    class Holder(nnx.Module):
      def __init__(self, leaves: list[jax.Array]):
        self.ws = nnx.List([nnx.Param(x) for x in leaves])

    model = Holder(list(params.values()))
    ema = nnx.EMA(model, decay=d)

    @nnx.jit(donate_argnums=0)
    def update(ema: Any, model: Any) -> None:
      ema.update(model)

    def run() -> Any:
      update(ema, model)
      return ema.params

    return run

  cases.append(
      Case(
          "(d) flax nnx.EMA (nnx.jit, donated)", nnx_ema,
          n * 3 * p_bytes if mixed else nbytes,
          note="keeps a bf16 average for bf16 params" if mixed else "",
          footprint=state_fp,
      )
  )

  def keras_ema() -> Callable[[], Any]:
    import keras

    variables = [keras.Variable(x) for x in params.values()]
    opt = keras.optimizers.SGD(learning_rate=0.0, use_ema=True, ema_momentum=d)
    opt.build(variables)
    train_values = [v.value for v in variables]

    # As Keras' JAX trainer runs it: stateless, inside a jitted, donated step,
    # the model's variables passed in (closed over, they would be constants).
    def update(opt_values: list[Any], train_values: list[Any]) -> list[Any]:
      mapping = list(zip(opt._trainable_variables, train_values)) + list(
          zip(opt.variables, opt_values)
      )
      with keras.StatelessScope(state_mapping=mapping) as scope:
        opt._update_model_variables_moving_average(opt._trainable_variables)
      return [scope.get_current_value(v) for v in opt.variables]

    step = jax.jit(update, donate_argnums=0)
    return threaded(
        step,
        [jnp.ones((), v.dtype) if v is opt.iterations else v.value
         for v in opt.variables],
        train_values,
    )

  cases.append(
      Case(
          "(e) keras use_ema optimizer update (jit, donated)", keras_ema,
          n * 3 * p_bytes if mixed else nbytes,
          note="keeps a bf16 average for bf16 params" if mixed else "",
          footprint=state_fp * 2,
      )
  )

  torch = _torch()
  if torch is not None:

    def torch_lerp() -> Callable[[], Any]:
      device = "cuda" if torch.cuda.is_available() else "cpu"
      dtype = {2: torch.bfloat16, 4: torch.float32}[p_bytes]
      ps = [
          torch.from_numpy(np.array(x.astype(jnp.float32))).to(device, dtype)
          for x in params.values()
      ]
      es = [p.float().clone() for p in ps]

      def run() -> Any:
        # torch's foreach needs equal dtypes: mixed precision converts first,
        # as timm's ModelEmaV3 does.
        src = [p.float() for p in ps] if mixed else ps
        torch._foreach_lerp_(es, src, 1 - d)
        return es

      return run

    sync = _torch_sync(torch)
    default_threads = _TORCH[1]
    # torch's OpenMP threads spin at barriers: on a loaded machine its default
    # thread count can be far slower than one thread, so both are shown.
    for threads in dict.fromkeys((default_threads, 1)):
      note = "params converted to float32 first" if mixed else ""
      cases.append(
          Case(
              f"(f) torch._foreach_lerp_ ({threads} thread{'s' * (threads > 1)})",
              torch_lerp, nbytes, note=note,
              footprint=state_fp * (3 if mixed else 2), sync=sync,
              before=lambda t=threads: torch.set_num_threads(t),
          )
      )
  else:
    skipped = Case("(f) torch._foreach_lerp_ (absent)", lambda: lambda: None, nbytes)
    skipped.skipped = "torch is not importable"
    cases.append(skipped)

  if leaves > 1:

    def flat_buffer() -> Callable[[], Any]:
      # The small-tree fast path, as a prototype: the average of all leaves in
      # one float32 buffer (the params stay separate leaves).
      def kernel(flat: jax.Array, p: Any) -> jax.Array:
        return d * flat + (1 - d) * _flat32(jax.tree.leaves(p))

      flat = _flat32(params.values())
      return threaded(jax.jit(kernel, donate_argnums=0), flat, params)

    cases.append(
        Case("prototype: one flat float32 buffer (jit, donated)", flat_buffer,
             nbytes, note="not shipped", footprint=state_fp * 2)
    )
  return cases


_TORCH: list[Any] = []


def _torch() -> Any:
  if not _TORCH:
    try:
      import torch

      if jax.default_backend() == "gpu" and not torch.cuda.is_available():
        torch = None  # a CPU torch beside a GPU JAX compares different devices
    except Exception:  # absent or broken: skipped, as documented
      torch = None
    _TORCH.append(torch)
    # Read once: the cases below change it.
    _TORCH.append(torch.get_num_threads() if torch is not None else 1)
  return _TORCH[0]


def _torch_sync(torch: Any) -> Callable[[Any], Any]:
  def sync(_: Any) -> None:
    if torch.cuda.is_available():
      torch.cuda.synchronize()

  return sync


# --------------------------------------------------------------------------
# Section 1b: the standalone update on a real tree

TREE_BASE = "(b) optax.incremental_update (jit, donated)"
SMALL_LEAF = 4096  # the grouping prototype's threshold, in elements


def real_tree(smoke: bool) -> dict[str, jax.Array]:
  """The Linen transformer LM's params (benchmarks/models.py), one flat dict."""
  import models

  cfg = (models.SMOKE if smoke else models.FULL)["lm"]
  x, _ = models.batch("lm", cfg)
  tree = models.linen_model("lm", cfg).init(jax.random.PRNGKey(0), x)["params"]
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _tree_cases(params: dict[str, jax.Array]) -> list[Case]:
  """`_ema_cases` on a real tree, and two ways to attribute the difference."""
  n = sum(x.size for x in params.values())
  cases = _ema_cases(params, n, len(params))
  d, nbytes, state_fp = DECAY, n * 12, n * 4.0

  def counted() -> Callable[[], Any]:
    # What every stateful EMA carries (optax.ema, ema_jax): a step count.
    def step(s: optax.EmaState, p: Any) -> optax.EmaState:
      return optax.EmaState(optax.safe_increment(s.count),
                            optax.incremental_update(p, s.ema, 1 - d))

    state = optax.EmaState(jnp.zeros((), jnp.int32), _f32(params))
    return threaded(jax.jit(step, donate_argnums=0), state, params)

  cases.append(
      Case("(b') optax.incremental_update + a count (optax.EmaState)", counted,
           nbytes, note="the count every EMA state keeps", footprint=state_fp)
  )

  def lerp_form() -> Callable[[], Any]:
    # ema_jax's arithmetic, `e + w (p - e)`, in a plain kernel without a count.
    def kernel(e: Any, p: Any) -> Any:
      return jax.tree.map(lambda e, p: e + (1 - d) * (p - e), e, p)

    return threaded(jax.jit(kernel, donate_argnums=0), _f32(params), params)

  cases.append(
      Case("(a') plain kernel in ema_jax's form e + w (p - e) (jit, donated)", lerp_form,
           nbytes, footprint=state_fp)
  )

  def grouped() -> Callable[[], Any]:
    # Leaves below SMALL_LEAF elements averaged as one buffer, the state kept
    # one array per leaf: concatenate, average, slice back.
    small = [k for k, x in params.items() if x.size < SMALL_LEAF]

    def step(e: Any, p: Any) -> Any:
      out = {k: optax.incremental_update(p[k], e[k], 1 - d)
             for k in e if k not in small}
      if small:
        flat = optax.incremental_update(
            jnp.concatenate([p[k].ravel() for k in small]),
            jnp.concatenate([e[k].ravel() for k in small]), 1 - d)
        offsets = np.cumsum([0] + [e[k].size for k in small])
        for k, a, b in zip(small, offsets[:-1], offsets[1:]):
          out[k] = flat[a:b].reshape(e[k].shape)
      return out

    return threaded(jax.jit(step, donate_argnums=0), _f32(params), params)

  cases.append(
      Case(f"prototype: leaves < {SMALL_LEAF} grouped, update only (jit, donated)",
           grouped, nbytes, note="not shipped", footprint=state_fp)
  )

  def one_buffer() -> Callable[[], Any]:
    # The same elements as one leaf: the loop alone, without the per-array
    # costs of a tree (the lower bound for any layout of the state).
    flat_p = _flat32(params.values())
    step = jax.jit(lambda e, p: optax.incremental_update(p, e, 1 - d), donate_argnums=0)
    return threaded(step, jnp.array(flat_p, copy=True), flat_p)

  cases.append(
      Case("reference: the same elements as one leaf (jit, donated)", one_buffer,
           nbytes, note="params and average as one array each", footprint=state_fp * 2)
  )
  return cases


def print_tree_table(res: dict[str, Any]) -> None:
  print(f"\n### Standalone update on a real tree ({res['leaves']} leaves, "
        f"{res['n']:,} elements, median leaf {res['median_leaf']}): "
        f"ratios to {TREE_BASE}")
  print(f"{'case':66}{'median':>10}{'p25-p75':>22}{'ratio':>8}{'paired (p25-p75)':>24}")
  for c in res["cases"]:
    if "median_s" not in c:
      print(f"{c['name']:66}  skipped: {c['skipped']}")
      continue
    pr = res["paired"].get(c["name"])
    paired = f"{pr['median']:.3f} ({pr['p25']:.3f}-{pr['p75']:.3f})" if pr else ""
    print(f"{c['name']:66}{_fmt_time(c['median_s']):>10}"
          f"{_fmt_time(c['p25_s']) + '-' + _fmt_time(c['p75_s']):>22}"
          f"{c['median_s'] / res['base_median_s']:>7.3f}x{paired:>24}")


# --------------------------------------------------------------------------
# Section 2: the train step


def _optimizers() -> dict[str, tuple[optax.GradientTransformation, int]]:
  # name -> (optimizer, params-sized arrays it reads + writes besides params and grads)
  return {"sgd": (optax.sgd(1e-3), 0), "adam": (optax.adam(1e-3), 4)}


def _step_variants(
    opt: optax.GradientTransformation, params: Any
) -> dict[str, tuple[Callable[..., Any], Callable[[], Any]]]:
  """name -> (step(params, state, grads) -> (params, state), init_state)."""

  def plain(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params: Any, state: Any, grads: Any) -> Any:
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  chain = optax.chain(opt, ema_jax.ema(DECAY))
  every = optax.chain(opt, ema_jax.ema(DECAY, update_every=EVERY))

  def fused(params: Any, state: Any, grads: Any) -> Any:
    opt_state, ema = state
    updates, opt_state = opt.update(grads, opt_state, params)
    params, ema = ema_jax.apply_updates_and_average(params, updates, ema, DECAY)
    return params, (opt_state, ema)

  return {
      "without EMA": (plain(opt), lambda: opt.init(params)),
      "ema() in the chain": (plain(chain), lambda: chain.init(params)),
      f"ema(update_every={EVERY}) in the chain": (plain(every), lambda: every.init(params)),
      "apply_updates_and_average": (
          fused,
          lambda: (opt.init(params), ema_jax.ema_params(chain.init(params))),
      ),
  }


def compile_step(step: Callable[..., Any], params: Any, state: Any, grads: Any) -> Any:
  # Grads are an argument, as a real step computes them: captured by a closure
  # they become constants and XLA plans the step differently.
  return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()


def _step_cases(
    opt_name: str, params: Any, n: int, ablation: bool, compiled_steps: dict[str, Any]
) -> tuple[list[Case], dict[str, Any]]:
  opt, extra = _optimizers()[opt_name]
  p_bytes = jnp.dtype(next(iter(params.values())).dtype).itemsize
  # Bytes a fused step must move at the least: params read + write, grads
  # read, optimizer state read + write (in the params' dtype), and with the
  # EMA the float32 average read + write.
  base = n * p_bytes * (3 + extra)
  with_ema = base + n * 2 * 4
  variants = _step_variants(opt, params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  info: dict[str, Any] = {
      "floor_ratio": with_ema / base,
      "floor_ratio_update_every": (base + n * 2 * 4 / EVERY) / base,
      "floor_bytes_without_ema": base,
      "floor_bytes_with_ema": with_ema,
  }
  names = list(variants)
  if ablation:
    names.append("ema() in the chain, CPU barrier off (ablation)")
  cases = []
  for name in names:
    step, init = variants[name.split(", CPU")[0]]

    def make(step: Any = step, init: Any = init, name: str = name) -> Callable[[], Any]:
      state = init()
      box = [_copy(params), state]
      restore = _engine._materialize
      try:
        if "barrier off" in name:
          _engine._materialize = lambda x: x
          # A new function, so that jit traces it again rather than reusing
          # the trace of the step with the barrier.
          step = (lambda f: lambda *a: f(*a))(step)
        compiled = compile_step(step, box[0], box[1], grads)
      finally:
        _engine._materialize = restore
      compiled_steps[name] = compiled

      def run() -> Any:
        # With update_every=k, k steps at a time: one averages, k - 1 do not.
        for _ in range(EVERY if "update_every" in name else 1):
          box[0], box[1] = compiled(box[0], box[1], grads)
        return box[0]

      return run

    footprint = n * (p_bytes * (3 + extra // 2) + (4 if "without" not in name else 0))
    nbytes = base if "without" in name else with_ema
    if "update_every" in name:
      nbytes = base + n * 2 * 4 / EVERY
    cases.append(
        Case(name, make, nbytes, footprint=footprint,
             steps_per_call=EVERY if "update_every" in name else 1)
    )
  return cases, info


def _xla_bytes_and_temps(
    opt_name: str, params: Any, compiled_steps: dict[str, Any]
) -> dict[str, Any]:
  """What XLA's compiled steps move and allocate, from its own analyses."""
  opt, _ = _optimizers()[opt_name]
  shapes = jax.eval_shape(lambda: params)
  out = {}
  compiled_steps = dict(compiled_steps)
  for name, (step, init) in _step_variants(opt, params).items():
    if name not in compiled_steps:  # skipped for memory: compiling needs no arrays
      compiled_steps[name] = compile_step(step, shapes, jax.eval_shape(init), shapes)
  for name, compiled in compiled_steps.items():
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    out[name] = {
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "temp_bytes": int(mem.temp_size_in_bytes),
    }
  return out


# --------------------------------------------------------------------------
# Section 3: time to the first step

FIRST_COUNTS = (10, 100, 1000, 10_000)
SMOKE_FIRST_COUNTS = (3,)


def first_step_group(cases: tuple[str, ...], leaves: int, rounds: int) -> dict[str, Any]:
  """Fresh-process samples of `cases` at `leaves`, with each case's overhead
  over its baseline and its ratio to its floor, paired within rounds."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "first_step.py")
  with tempfile.TemporaryDirectory() as directory:
    args = [str(leaves)]
    if set(cases) & set(first_step.CALL_CASES):
      # The files the whole-call cases read: written once, untimed.
      subprocess.run([sys.executable, script, "--setup", directory, str(leaves)], check=True,
                     capture_output=True)
      args.append(directory)
    samples = fresh_rounds(script, list(cases), args, rounds)
  total = {k: [first_step.total_s(s) for s in v] for k, v in samples.items()}
  res: dict[str, Any] = {"leaves": leaves, "rounds": rounds,
                         "load_average": list(os.getloadavg()), "cases": {}}
  for name, ss in samples.items():
    c: dict[str, Any] = {"samples": ss}
    for key in ("trace_lower_s", "compile_s", "first_call_s", "ops"):
      if key in ss[0]:
        c[key] = ss[0][key] if key == "ops" else quartiles([s[key] for s in ss])
    c["total_s"] = quartiles(total[name])
    base = (first_step.FLOORS.get(name) if name not in first_step.STEP_CASES else
            first_step.NNX_BASE if name.startswith("nnx") else first_step.step_bases(name)[0])
    if base and base != name:
      c["base"] = base
      c["ratio"] = quartiles([a / b for a, b in zip(total[name], total[base])])
      c["overhead_s"] = quartiles([a - b for a, b in zip(total[name], total[base])])
    res["cases"][name] = c
  for name, c in res["cases"].items():
    if name not in first_step.STEP_CASES or name.startswith("nnx"):
      continue
    plain, by_hand_case = first_step.step_bases(name)
    if "overhead_s" not in c or by_hand_case not in samples:
      continue
    hand = res["cases"][by_hand_case]["overhead_s"]
    per_round = [a - b for a, b in zip(total[name], total[plain])]
    by_hand = [a - b for a, b in zip(total[by_hand_case], total[plain])]
    # Overheads of a few ms at 10 leaves are noise: the ratio of medians.
    c["overhead_vs_by_hand"] = c["overhead_s"]["median"] / hand["median"]
    c["overhead_vs_by_hand_paired"] = quartiles(
        [a / b for a, b in zip(per_round, by_hand) if b > 0] or [float("nan")])
    same = first_step.SAME_BY_HAND.get(name)
    if same in samples:
      # Beside the same arithmetic by hand (a schedule, two averages).
      c["same_by_hand"] = same
      c["overhead_vs_same_by_hand"] = (
          c["overhead_s"]["median"] / res["cases"][same]["overhead_s"]["median"])
  return res


def _first_cell(c: dict[str, Any] | None) -> str:
  """One case at one leaf count: its times, its ratio, its overheads' ratios."""
  if c is None:
    return "not run"
  cell = (f"{_fmt_time(c['first_call_s']['median'])}" if "first_call_s" in c else
          f"{_fmt_time(c['trace_lower_s']['median'])} / {_fmt_time(c['compile_s']['median'])}")
  if "ratio" in c:
    cell += f" ({c['ratio']['median']:.2f}x)"
  if "overhead_vs_same_by_hand" in c:
    cell += f" [{c['overhead_vs_by_hand']:.2f}; {c['overhead_vs_same_by_hand']:.2f}]"
  elif "overhead_vs_by_hand" in c:
    cell += f" [{c['overhead_vs_by_hand']:.2f}]"
  return cell


def print_first_table(groups: list[dict[str, Any]]) -> None:
  if not groups:
    return
  counts = sorted({g["leaves"] for g in groups})
  whole = any("first_call_s" in c for g in groups for c in g["cases"].values())
  print("\n### Time to the first step: " + ("the whole first call" if whole else "trace+lower / compile")
        + ", median over fresh processes; (x): total / its baseline's or floor's, paired "
        "within rounds")
  names = list(dict.fromkeys(n for g in groups for n in g["cases"]))
  rows = {name: [_first_cell(next(
      (g["cases"][name] for g in groups if g["leaves"] == n and name in g["cases"]), None))
      for n in counts] for name in names}
  width = max(len(n) for n in names) + 2
  cell_width = max(len(cell) for cells in rows.values() for cell in cells) + 2
  print("".ljust(width) + "".join(f"{n} leaves".rjust(cell_width) for n in counts))
  for name, cells in rows.items():
    print(name.ljust(width) + "".join(cell.rjust(cell_width) for cell in cells))
  if first_step.BY_HAND in names:
    print("[r]: the case's overhead over the step without EMA, as a multiple of the "
          "by-hand incremental_update's overhead (ratio of medians); [r; s]: s, of the "
          "same arithmetic's by hand")


# --------------------------------------------------------------------------
# Output


def _fmt_size(n: int) -> str:
  return f"1e{int(round(np.log10(n)))}" if n >= 10 and 10 ** int(round(np.log10(n))) == n else str(n)


def print_ema_table(title: str, rows: dict[str, dict[int, dict[str, Any]]], sizes: list[int]) -> None:
  print(f"\n### {title}: median time per update (GB/s)")
  width = max(len(k) for k in rows) + 2
  print("".ljust(width) + "".join(f"N={_fmt_size(n)}".rjust(22) for n in sizes))
  for name, by_n in rows.items():
    cells = []
    for n in sizes:
      r = by_n.get(n)
      if r is None:
        cells.append("not run".rjust(22))
      elif "skipped" in r:
        cells.append("skipped".rjust(22))
      else:
        cells.append(f"{_fmt_time(r['median_s'])} ({r['gb_per_s']:.3g})".rjust(22))
    print(name.ljust(width) + "".join(cells))
  for name, by_n in rows.items():
    for n, r in by_n.items():
      if "skipped" in r:
        print(f"  skipped {name} at N={_fmt_size(n)}: {r['skipped']}")
        break
  for name, by_n in rows.items():
    note = next((r.get("note") for r in by_n.values() if r.get("note")), "")
    if note:
      print(f"  note: {name}: {note}")


def print_step_table(results: list[dict[str, Any]]) -> None:
  print("\n### Train step: median step time; overhead = step / step without EMA")
  header = (
      f"{'step':8}{'dtype':7}{'leaves':>7}{'N':>6}  {'without EMA':>12}"
      f"{'ema() chain':>22}{'apply_updates_and_avg':>24}{'floor':>7}{'XLA bytes':>10}"
      f"{f'update_every={EVERY}':>24}{'its floor':>10}"
  )
  print(header)
  for r in results:
    cases = {c["name"]: c for c in r["cases"]}
    base = cases.get("without EMA", {})
    if "median_s" not in base:
      print(f"{r['optimizer']:8}{r['dtype']:7}{r['leaves']:>7}{_fmt_size(r['n']):>6}  skipped")
      continue

    def cell(name: str, w: int) -> str:
      c = cases.get(name, {})
      if "median_s" not in c:
        return "skipped".rjust(w)
      return f"{_fmt_time(c['median_s'])} ({c['median_s'] / base['median_s']:.2f}x)".rjust(w)

    xla = r["xla"]["ema() in the chain"]["bytes_accessed"] / r["xla"]["without EMA"]["bytes_accessed"]
    print(
        f"{r['optimizer']:8}{r['dtype']:7}{r['leaves']:>7}{_fmt_size(r['n']):>6}  "
        f"{_fmt_time(base['median_s']):>12}{cell('ema() in the chain', 22)}"
        f"{cell('apply_updates_and_average', 24)}{r['floor_ratio']:>6.2f}x{xla:>9.2f}x"
        f"{cell(f'ema(update_every={EVERY}) in the chain', 24)}"
        f"{r['floor_ratio_update_every']:>9.2f}x"
    )
    ab = "ema() in the chain, CPU barrier off (ablation)"
    if ab in cases and "median_s" in cases[ab]:
      print(f"{'':28}ablation, CPU barrier off: {cell(ab, 0).strip()}")


def targets(
    ema_results: list[dict[str, Any]],
    step_results: list[dict[str, Any]],
    tree_results: list[dict[str, Any]],
    big: int,
) -> list[str]:
  """The issue's targets, judged on this run's medians."""
  lines = []
  ours = "ema_jax ema().update (jit, donated)"
  for res in tree_results:
    pr = res["paired"].get(ours)
    if pr:
      lines.append(
          f"real tree ({res['leaves']} leaves): ema_jax {pr['median']:.3f}x "
          f"optax.incremental_update, paired within rounds (quartiles "
          f"{pr['p25']:.3f}-{pr['p75']:.3f}; target <= 1: "
          f"{'met' if pr['median'] <= 1 else 'NOT met'})"
      )

  def get(res: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in res["cases"] if c["name"] == name and "median_s" in c), None)

  for res in ema_results:
    if res["dtype"] != "float32" or res["n"] < big:
      continue
    a = get(res, ours)
    k = get(res, "(a) plain elementwise kernel (jit, donated)")
    inc = get(res, "(b) optax.incremental_update (jit, donated)")
    if a and k and inc:
      ratio = k["median_s"] / a["median_s"]
      vs_inc = a["median_s"] / inc["median_s"]
      lines.append(
          f"standalone, {res['leaves']} leaves, N={_fmt_size(res['n'])}: "
          f"{ratio:.2f}x the plain kernel's throughput (target >= 0.9: "
          f"{'met' if ratio >= 0.9 else 'NOT met'}); time {vs_inc:.2f}x "
          f"optax.incremental_update donated (target <= 1: "
          f"{'met' if vs_inc <= 1 else 'NOT met'})"
      )
  for res in ema_results:
    if res["leaves"] == 1 or res["dtype"] != "float32" or res["n"] > 10**6:
      continue
    a = get(res, ours)
    torch = next(
        (c for c in res["cases"] if c["name"].startswith("(f)") and "median_s" in c
         and c["median_s"] == min(x.get("median_s", 1e9) for x in res["cases"]
                                  if x["name"].startswith("(f)"))), None)
    flat = get(res, "prototype: one flat float32 buffer (jit, donated)")
    if a:
      line = (
          f"many small leaves ({res['leaves']} leaves, N={_fmt_size(res['n'])}): "
          f"ema_jax {_fmt_time(a['median_s'])} = the per-leaf jitted baseline "
          "(speedup 1.00x, target >= 2x: NOT met)"
      )
      if flat:
        line += f"; flat-buffer prototype {a['median_s'] / flat['median_s']:.2f}x faster"
      if torch:
        line += f"; best torch foreach {_fmt_time(torch['median_s'])}"
      lines.append(line)
  for r in step_results:
    if r["n"] < big or r["dtype"] != "float32":
      continue
    cases = {c["name"]: c for c in r["cases"]}
    base = cases.get("without EMA", {})
    for name in ("ema() in the chain", "apply_updates_and_average"):
      c = cases.get(name, {})
      if "median_s" in c and "median_s" in base:
        ratio = c["median_s"] / base["median_s"]
        ok = ratio <= 1.05 * r["floor_ratio"]
        temp = r["xla"][name]["temp_bytes"]
        lines.append(
            f"step {r['optimizer']}, {r['leaves']} leaves, N={_fmt_size(r['n'])}, {name}: "
            f"overhead {ratio:.2f}x vs floor {r['floor_ratio']:.2f}x (target <= "
            f"{1.05 * r['floor_ratio']:.2f}x: {'met' if ok else 'NOT met'}); "
            f"XLA temporaries {temp} bytes"
        )
  return lines


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds")
  parser.add_argument("--out", help="JSON path (default benchmarks/results/bench-<time>.json)")
  parser.add_argument("--rounds", type=int, help="interleaved rounds per group")
  parser.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                      help="comma-separated element counts, e.g. 1e5,1e6")
  parser.add_argument("--sections", default="ema,step,tree,first",
                      help="comma-separated: ema,step,tree,first (default all)")
  parser.add_argument("--first-counts", type=lambda s: [int(float(x)) for x in s.split(",")],
                      help="leaf counts of the first-step section, e.g. 10,1000")
  parser.add_argument("--first-groups", default="step,entry,calls",
                      help="groups of the first-step section: step,entry,calls (default all); "
                           "core: the step without EMA, by hand and with ema() only")
  parser.add_argument("--first-rounds", type=int,
                      help="fresh-process rounds of the first-step section (default 5; "
                           "3 above 1000 leaves)")
  parser.add_argument("--peak-gbs", type=float, help="the device's memory bandwidth, GB/s")
  args = parser.parse_args(argv)

  sizes = args.sizes or list(SMOKE_SIZES if args.smoke else FULL_SIZES)
  rounds = args.rounds or (2 if args.smoke else 11)
  min_sample_s = 0.001 if args.smoke else 0.02
  many = 4 if args.smoke else MANY_LEAVES
  big = max(s for s in sizes if s <= 10**7) if args.smoke else 10**7
  sections = set(args.sections.split(","))

  started = time.time()
  report = start(
      "ema_jax benchmark", args.smoke,
      {"decay": DECAY, "rounds": rounds, "min_sample_s": min_sample_s,
       "sizes": sizes, "many_leaves": many},
      ema=[], step=[], tree=[], first=[],
  )

  if "ema" in sections:
    for dtype in (jnp.float32, jnp.bfloat16):
      for leaves in (1, many):
        rows: dict[str, dict[int, dict[str, Any]]] = {}
        for n in sizes:
          params = make_params(n, leaves, dtype)
          cases = _ema_cases(params, n, leaves)
          run_group(cases, rounds, min_sample_s)
          res = {
              "dtype": jnp.dtype(dtype).name, "leaves": leaves, "n": n,
              "load_average": list(os.getloadavg()),
              "cases": [summary(c) for c in cases],
          }
          if args.peak_gbs:
            for c in res["cases"]:
              if "gb_per_s" in c:
                c["fraction_of_peak"] = c["gb_per_s"] / args.peak_gbs
          report["ema"].append(res)
          for c in res["cases"]:
            rows.setdefault(c["name"], {})[n] = c
          del params, cases
          gc.collect()
        ema_name = "float32 params" if dtype == jnp.float32 else "bfloat16 params, float32 average"
        print_ema_table(f"EMA update, {ema_name}, {leaves} leaves", rows, sizes)

  if "step" in sections:
    for dtype in (jnp.float32, jnp.bfloat16):
      for leaves in (1,) if args.smoke else (1, many):
        for n in sizes:
          params = make_params(n, leaves, dtype)
          for opt_name in ("sgd", "adam"):
            compiled_steps: dict[str, Any] = {}
            cases, info = _step_cases(
                opt_name, params, n, dtype == jnp.bfloat16 and not args.smoke,
                compiled_steps,
            )
            run_group(cases, rounds, min_sample_s)
            res = {
                "optimizer": opt_name, "dtype": jnp.dtype(dtype).name,
                "leaves": leaves, "n": n, **info,
                "xla": _xla_bytes_and_temps(opt_name, params, compiled_steps),
                "load_average": list(os.getloadavg()),
                "cases": [summary(c) for c in cases],
            }
            report["step"].append(res)
          del params
          gc.collect()
    print_step_table(report["step"])
    print("floor: the byte-count floor (one pass: read params, grads, state and the "
          "average, write them back); XLA bytes: the same ratio for the bytes XLA's "
          "compiled steps access (cost_analysis).")

  if "tree" in sections:
    params = real_tree(args.smoke)
    cases = _tree_cases(params)
    # Sub-millisecond samples: twice the rounds, for stable paired ratios.
    run_group(cases, 2 * rounds, min_sample_s)
    sizes_ = sorted(x.size for x in params.values())
    res = {
        "leaves": len(params), "n": sum(sizes_),
        "median_leaf": int(np.median(sizes_)),
        "load_average": list(os.getloadavg()),
        "cases": [summary(c) for c in cases],
        "paired": paired_ratios(cases, TREE_BASE),
    }
    res["base_median_s"] = next(
        c["median_s"] for c in res["cases"] if c["name"] == TREE_BASE)
    report["tree"].append(res)
    print_tree_table(res)
    del params, cases
    gc.collect()

  if "first" in sections:
    for leaves in args.first_counts or (SMOKE_FIRST_COUNTS if args.smoke else FIRST_COUNTS):
      rounds_ = args.first_rounds or (1 if args.smoke else 5 if leaves <= 1000 else 3)
      groups = {"step": first_step.STEP_CASES, "entry": first_step.ENTRY_CASES,
                "calls": first_step.CALL_CASES,
                "core": first_step.STEP_CASES[:3]}
      for name, (most, why) in first_step.MAX_LEAVES.items():
        if leaves > most:
          groups = {k: tuple(c for c in v if c != name) for k, v in groups.items()}
          print(f"first: skipped {name!r} at {leaves} leaves: {why}")
      for group in args.first_groups.split(","):
        report["first"].append(first_step_group(groups[group], leaves, rounds_))
    print_first_table([g for g in report["first"] if first_step.STEP_BASE in g["cases"]])
    print_first_table([g for g in report["first"] if first_step.ENTRY_BASE in g["cases"]])
    print_first_table([g for g in report["first"] if first_step.RESTORE_BASE in g["cases"]])

  # Tiny sizes say nothing about the targets: smoke mode only checks that it runs.
  lines = [] if args.smoke else targets(report["ema"], report["step"], report["tree"], big)
  report["targets"] = lines
  if lines:
    print("\n### Targets (this run)")
    for line in lines:
      print("- " + line)
  if jax.default_backend() == "gpu" and not args.peak_gbs:
    print("GPU: pass --peak-gbs=<the card's bandwidth> to report the fraction of peak.")

  return finish(report, started, args.out, "bench")

if __name__ == "__main__":
  sys.exit(main())
