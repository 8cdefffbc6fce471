"""The EMA in real training and evaluation steps, beside the alternatives.

Run with `make bench-models` (full) or `--smoke` (tiny models, under a
minute). Two models, each in Flax Linen and NNX:

  lm   a decoder-only transformer LM: many small LayerNorm and bias leaves.
  cnn  a ResNet-style CNN with BatchNorm (statistics that `average_stats`
       averages too).

Train steps (AdamW), one group per (model, framework), timed in interleaved
rounds (benchmarks/harness.py): without EMA, with `ema()`, with
`ema(update_every=4)`, with `average_stats` (CNN), beside `nnx.EMA`,
`optax.incremental_update` by hand, Keras 3 `use_ema` (JAX backend) and
timm `ModelEmaV3` (the same models in PyTorch, eager, AdamW, on as many
threads as JAX's CPU client uses). The timm rows appear when torch and timm
are installed in the benchmark's environment (`pip install torch==2.13.0
timm`); without them the table and the JSON hold one skipped `ModelEmaV3`
row that says so. `--frameworks` runs some groups only (`--frameworks timm`:
the timm rows alone). NNX runs in each pattern a user meets: `nnx.jit`,
`nnx.jit` with donation, `nnx.cached_partial`, and `nnx.split` + `jax.jit`
(donated). Each train case also records its host dispatch: the time until the
step call returns, the device idle before it.

Evaluation with the EMA (hook, context manager, `swap` inside the jitted
eval, `nnx.EMA` view) beside plain evaluation, and the NNX swap round trip
alone beside NNX's own floor for an in-place swap of the same model (read
the params and write them back, twice: `nnx.state` + `nnx.update`).

Every record holds (model, framework, case), the median, quartiles and the
ratio to the group's baseline (the step without EMA, plain evaluation, or the
floor). The table goes to stdout, the JSON to benchmarks/results/ or `--out`;
`python benchmarks/report.py <json>` prints every group's table from it.

The models: `lm` has 4 blocks, width 128, 4 heads, a vocabulary of 512, 32
tokens, batch 4 (929,024 params in 70 leaves, the median leaf 128 elements);
`cnn` has 2 stages of 2 residual blocks, widths 32 and 64, 32x32 images,
batch 32 (170,762 params in 40 leaves). Optimizer `optax.adamw(1e-3)`, decay
0.999; the PyTorch models have the same layers and parameter counts, with
`AdamW(1e-3, weight_decay=1e-4)`. Where PyPI's torchvision does not load
beside the CPU torch wheel ("operator torchvision::nms does not exist"),
`import timm` fails, and timm's own `timm/utils/model_ema.py` (which imports
only torch) is loaded by itself: the same class; the row's note says so.

What docs/benchmarks.md's run (`--rounds 31`, 600 s, 2-core AMD EPYC VM,
CPU) measured beyond the page's summary table, as ratios to the group's
baseline:

  train, lm   bare `nnx.jit` is host-bound (dispatch 22-25 ms of a 23-30 ms
              step): `ema()` 1.30x, `nnx.EMA` 1.31x; `nnx.cached_partial`
              `ema()` 1.18x (1.04x in a 31-round rerun of the NNX groups),
              `nnx.EMA` 1.10x.
  train, cnn  every ema_jax case 0.97-1.04x, `average_stats` 0.98-1.04x,
              `nnx.EMA` 0.98-1.05x.
  eval, lm    Linen: hook 1.64x (a 2 ms evaluation), context manager 1.35x,
              `swap` inside the jitted evaluation 1.06x. NNX: hook 2.46x,
              context manager 2.51x (1.81x with a `nnx.cached_partial`
              evaluation), `swap` inside `nnx.jit` 2.40x (passing the
              optimizer through `nnx.jit` costs more than the swap), an
              `nnx.EMA` view 0.90x (it keeps a second copy of the Variables).
  eval, cnn   Linen: hook 1.06x, context manager 1.03x, `swap` 1.00x. NNX:
              1.11x, 1.18x, 1.13x; `nnx.EMA` view 1.01x.
  round trip  `ema_weights` entered and left against NNX's floor: 0.90x (lm),
              0.80x (cnn). Before it read only the EMA's part of the state,
              the same round trip measured 3.45x on a 69-leaf transformer.

Dispatch of bare `nnx.jit` moves by tens of percent between runs (the 31-round
run measured the LM's step at 24.7 ms without and 21.7 ms with `ema()`); the
`optax.ema()` reference (`--frameworks nnx`) separates ema_jax's cost from
that of any optimizer state of the EMA's size.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import os
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import ema_jax  # noqa: E402
import ema_jax.flax  # noqa: E402
from harness import Case, finish, fmt_time, run_group, start, summary, threaded  # noqa: E402

DECAY = 0.999
EVERY = 4
LR = 1e-3

FULL = {
    "lm": dict(vocab=512, d=128, heads=4, layers=4, seq=32, batch=4),
    "cnn": dict(size=32, widths=(32, 64), blocks=2, classes=10, batch=32),
}
SMOKE = {
    "lm": dict(vocab=32, d=16, heads=2, layers=1, seq=8, batch=2),
    "cnn": dict(size=8, widths=(8,), blocks=1, classes=4, batch=4),
}


# --------------------------------------------------------------------------
# Models: Linen


class LinenBlock(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + nn.SelfAttention(self.heads)(nn.LayerNorm()(x), mask=mask)
    return x + nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(nn.LayerNorm()(x))))


class LinenLM(nn.Module):
  vocab: int
  d: int
  heads: int
  layers: int
  seq: int

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = True) -> jax.Array:
    del train
    pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
    x = nn.Embed(self.vocab, self.d)(tokens) + pos[: tokens.shape[1]]
    for _ in range(self.layers):
      x = LinenBlock(self.heads)(x)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


class LinenResBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(nn.BatchNorm, use_running_average=not train)
    y = nn.relu(bn()(nn.Conv(self.width, (3, 3))(x)))
    y = bn()(nn.Conv(self.width, (3, 3))(y))
    if x.shape[-1] != self.width:
      x = nn.Conv(self.width, (1, 1))(x)
    return nn.relu(x + y)


class LinenCNN(nn.Module):
  widths: tuple[int, ...]
  blocks: int
  classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(
        nn.Conv(self.widths[0], (3, 3))(x)))
    for i, w in enumerate(self.widths):
      if i:
        x = nn.avg_pool(x, (2, 2), (2, 2))
      for _ in range(self.blocks):
        x = LinenResBlock(w)(x, train)
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------
# Models: NNX


class NNXBlock(nnx.Module):
  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NNXLM(nnx.Module):
  def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq, d)) * 0.02)
    self.blocks = nnx.List([NNXBlock(d, heads, rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


class NNXResBlock(nnx.Module):
  def __init__(self, cin: int, width: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(cin, width, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, rngs=rngs)
    self.conv2 = nnx.Conv(width, width, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(width, rngs=rngs)
    self.proj = nnx.Conv(cin, width, (1, 1), rngs=rngs) if cin != width else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
    return nnx.relu((x if self.proj is None else self.proj(x)) + y)


class NNXCNN(nnx.Module):
  def __init__(self, size: int, widths: tuple[int, ...], blocks: int, classes: int,
               rngs: nnx.Rngs):
    del size
    self.stem = nnx.Conv(3, widths[0], (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(widths[0], rngs=rngs)
    layers, cin = [], widths[0]
    for w in widths:
      for _ in range(blocks):
        layers.append(NNXResBlock(cin, w, rngs))
        cin = w
    self.layers = nnx.List(layers)
    self.stage_starts = tuple(i * blocks for i in range(1, len(widths)))
    self.head = nnx.Linear(cin, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn(self.stem(x)))
    for i, layer in enumerate(self.layers):
      if i in self.stage_starts:
        x = nnx.avg_pool(x, (2, 2), (2, 2))
      x = layer(x)
    return self.head(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------
# Data and losses


def batch(model: str, cfg: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
  key = jax.random.key(1)
  if model == "lm":
    tokens = jax.random.randint(key, (cfg["batch"], cfg["seq"] + 1), 0, cfg["vocab"])
    return tokens[:, :-1], tokens[:, 1:]
  x = jax.random.normal(key, (cfg["batch"], cfg["size"], cfg["size"], 3))
  return x, jax.random.randint(key, (cfg["batch"],), 0, cfg["classes"])


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def linen_model(model: str, cfg: dict[str, Any]) -> nn.Module:
  if model == "lm":
    return LinenLM(cfg["vocab"], cfg["d"], cfg["heads"], cfg["layers"], cfg["seq"])
  return LinenCNN(tuple(cfg["widths"]), cfg["blocks"], cfg["classes"])


def nnx_model(model: str, cfg: dict[str, Any]) -> nnx.Module:
  if model == "lm":
    return NNXLM(cfg["vocab"], cfg["d"], cfg["heads"], cfg["layers"], cfg["seq"], nnx.Rngs(0))
  return NNXCNN(cfg["size"], tuple(cfg["widths"]), cfg["blocks"], cfg["classes"], nnx.Rngs(0))


def sizes(model: str, cfg: dict[str, Any]) -> dict[str, int]:
  params = nnx.state(nnx_model(model, cfg), nnx.Param)
  leaves = jax.tree.leaves(params)
  return {"params": int(sum(x.size for x in leaves)), "param_leaves": len(leaves),
          "median_leaf": int(np.median([x.size for x in leaves]))}


def _ema(case: str) -> optax.GradientTransformation | None:
  if case in ("ema()", "average_stats"):
    return ema_jax.ema(DECAY)
  if case == f"ema(update_every={EVERY})":
    return ema_jax.ema(DECAY, update_every=EVERY)
  if case == OPTAX_EMA:
    # Not an EMA of the params (optax.ema averages the updates), but an optax
    # state of the same size: the host cost of that many more Variables.
    return optax.ema(DECAY, debias=False)
  return None


# In the NNX groups only, where a step's host dispatch grows with the Variables.
OPTAX_EMA = "optax.ema() (reference: a state of the same size)"


def _tx(ema: optax.GradientTransformation | None) -> optax.GradientTransformation:
  opt = optax.adamw(LR)
  return opt if ema is None else optax.chain(opt, ema)


TRAIN_CASES = ["no EMA", "ema()", f"ema(update_every={EVERY})", "average_stats"]


def train_cases(model: str, peer: str) -> list[str]:
  """The train cases of a framework: `average_stats` where there are
  statistics (the CNN's BatchNorm), and the framework's own way to average."""
  return [c for c in TRAIN_CASES if c != "average_stats" or model == "cnn"] + [peer]


# --------------------------------------------------------------------------
# Linen


def linen_train_cases(model: str, cfg: dict[str, Any]) -> list[Case]:
  net = linen_model(model, cfg)
  x, y = batch(model, cfg)
  cases = []
  for case in train_cases(model, "optax.incremental_update by hand"):

    def make(case: str = case) -> Callable[[], Any]:
      variables = net.init(jax.random.key(0), x)
      ema = _ema(case)
      state = ema_jax.flax.TrainState.create(
          apply_fn=net.apply, params=variables["params"], tx=_tx(ema),
          batch_stats=variables.get("batch_stats"),
          average_stats=ema if case == "average_stats" else None,
      )
      by_hand = case.startswith("optax")
      carry = (state, jax.tree.map(jnp.copy, state.params) if by_hand else None)

      def loss(params: Any, stats: Any) -> Any:
        v = {"params": params} | ({"batch_stats": stats} if stats is not None else {})
        if stats is None:
          return xent(net.apply(v, x), y), None
        out, upd = net.apply(v, x, mutable=["batch_stats"])
        return xent(out, y), upd["batch_stats"]

      @functools.partial(jax.jit, donate_argnums=0)
      def step(carry: Any, x: Any, y: Any) -> Any:
        state, avg = carry
        grads, stats = jax.grad(loss, has_aux=True)(state.params, state.batch_stats)
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        if avg is not None:
          avg = optax.incremental_update(state.params, avg, 1 - DECAY)
        return state, avg

      return threaded(step, carry, x, y)

    cases.append(Case(case, make, 0.0))
  return cases


def linen_eval_cases(model: str, cfg: dict[str, Any]) -> list[Case]:
  net = linen_model(model, cfg)
  x, _ = batch(model, cfg)
  variables = net.init(jax.random.key(0), x)
  state = ema_jax.flax.TrainState.create(
      apply_fn=net.apply, params=variables["params"], tx=_tx(ema_jax.ema(DECAY)),
      batch_stats=variables.get("batch_stats"),
  )
  extra = {"batch_stats": state.batch_stats} if state.batch_stats is not None else {}

  @jax.jit
  def evaluate(params: Any) -> jax.Array:
    return net.apply({"params": params} | extra, x, train=False)

  @jax.jit
  def evaluate_swapped(params: Any, opt_state: Any) -> jax.Array:
    return evaluate(ema_jax.swap(params, opt_state)[0])

  hook = ema_jax.flax.SwapEMAWeights()

  def with_hook() -> Any:
    s = hook.on_test_begin(state)
    out = evaluate(s.params)
    hook.on_test_end(s)
    return out

  def with_manager() -> Any:
    with ema_jax.flax.ema_weights(state) as s:
      return evaluate(s.params)

  def round_trip() -> Any:
    return hook.on_test_end(hook.on_test_begin(state)).params

  return [
      Case("plain eval", lambda: lambda: evaluate(state.params), 0.0),
      Case("hook (on_test_begin/end)", lambda: with_hook, 0.0),
      Case("context manager", lambda: with_manager, 0.0),
      Case("swap inside the jitted eval", lambda: lambda: evaluate_swapped(
          state.params, state.opt_state), 0.0),
      Case("hook round trip alone", lambda: round_trip, 0.0),
  ]


# --------------------------------------------------------------------------
# NNX


PATTERNS = ["nnx.jit", "nnx.jit (donated)", "nnx.cached_partial", "nnx.split + jax.jit (donated)"]


def _nnx_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  return xent(model(x), y)


def _nnx_setup(model: str, cfg: dict[str, Any], case: str) -> tuple[nnx.Module, Any, Any]:
  net = nnx_model(model, cfg)
  ema = _ema(case)
  if case == "average_stats":
    opt: Any = ema_jax.flax.Optimizer(net, _tx(ema), wrt=nnx.Param, average_stats=ema)
  else:
    opt = nnx.Optimizer(net, _tx(ema), wrt=nnx.Param)
  flax_ema = nnx.EMA(net, decay=DECAY, only=nnx.Param) if case == "nnx.EMA" else None
  return net, opt, flax_ema


def _nnx_step(model: nnx.Module, optimizer: Any, flax_ema: Any, x: Any, y: Any) -> None:
  grads = nnx.grad(_nnx_loss)(model, x, y)
  optimizer.update(model, grads)
  if flax_ema is not None:
    flax_ema.update(model)


def nnx_train_cases(model: str, cfg: dict[str, Any], pattern: str) -> list[Case]:
  x, y = batch(model, cfg)
  cases = []
  for case in train_cases(model, "nnx.EMA") + [OPTAX_EMA]:

    def make(case: str = case) -> Callable[[], Any]:
      net, opt, flax_ema = _nnx_setup(model, cfg, case)
      if pattern.startswith("nnx.jit"):
        donate = (0, 1, 2) if "donated" in pattern else ()
        step = nnx.jit(_nnx_step, donate_argnums=donate)
        return lambda: step(net, opt, flax_ema, x, y) or opt.step
      if pattern == "nnx.cached_partial":
        cached = nnx.cached_partial(nnx.jit(_nnx_step), net, opt, flax_ema)
        return lambda: cached(x, y) or opt.step
      graphdef, state = nnx.split((net, opt, flax_ema))

      @functools.partial(jax.jit, donate_argnums=0)
      def split_step(state: Any, x: Any, y: Any) -> Any:
        net, opt, flax_ema = nnx.merge(graphdef, state)
        _nnx_step(net, opt, flax_ema, x, y)
        return nnx.state((net, opt, flax_ema))

      return threaded(split_step, state, x, y)

    cases.append(Case(case, make, 0.0))
  return cases


def nnx_eval_cases(model: str, cfg: dict[str, Any]) -> list[Case]:
  x, y = batch(model, cfg)
  net, opt, _ = _nnx_setup(model, cfg, "ema()")
  net.eval()
  flax_ema = nnx.EMA(net, decay=DECAY, only=nnx.Param)
  ema_view = flax_ema.apply_to(net)
  evaluate = nnx.jit(lambda m, x: m(x))
  cached = nnx.cached_partial(evaluate, net)
  hook = ema_jax.flax.SwapEMAWeights()

  @nnx.jit
  def evaluate_swapped(m: nnx.Module, optimizer: Any, x: jax.Array) -> jax.Array:
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    ema, _ = ema_jax.swap(nnx.as_pure(params), nnx.as_pure(optimizer.opt_state))
    return nnx.merge(graphdef, ema, rest)(x)

  def with_hook() -> Any:
    hook.on_test_begin(net, opt)
    out = evaluate(net, x)
    hook.on_test_end(net, opt)
    return out

  def with_manager() -> Any:
    with ema_jax.flax.ema_weights(net, opt):
      return evaluate(net, x)

  def with_manager_cached() -> Any:
    # The swap writes into the model's own Variables, so a cached partial
    # (graph walked once) evaluates whatever is in them.
    with ema_jax.flax.ema_weights(net, opt):
      return cached(x)

  def round_trip() -> Any:
    with ema_jax.flax.ema_weights(net, opt):
      pass
    return None

  def floor() -> Any:
    for _ in range(2):
      nnx.update(net, nnx.state(net, nnx.Param))
    return None

  return [
      Case("plain eval", lambda: lambda: evaluate(net, x), 0.0),
      Case("plain eval (nnx.cached_partial)", lambda: lambda: cached(x), 0.0),
      Case("hook (on_test_begin/end)", lambda: with_hook, 0.0),
      Case("context manager", lambda: with_manager, 0.0),
      Case("context manager + nnx.cached_partial eval", lambda: with_manager_cached, 0.0),
      Case("swap inside the jitted eval", lambda: lambda: evaluate_swapped(net, opt, x), 0.0),
      Case("nnx.EMA view (apply_to)", lambda: lambda: evaluate(ema_view, x), 0.0),
      Case("round trip alone: ema_weights enter + exit", lambda: round_trip, 0.0),
      Case("floor: nnx.state + nnx.update, twice", lambda: floor, 0.0),
  ]


# --------------------------------------------------------------------------
# Keras 3 and timm


def keras_train_cases(model: str, cfg: dict[str, Any]) -> list[Case]:
  import keras

  x, y = (np.asarray(a) for a in batch(model, cfg))

  def build() -> Any:
    L = keras.layers
    if model == "lm":
      inp = keras.Input((cfg["seq"],), dtype="int32")
      h = L.Embedding(cfg["vocab"], cfg["d"])(inp)
      for _ in range(cfg["layers"]):
        a = L.LayerNormalization()(h)
        h = h + L.MultiHeadAttention(cfg["heads"], cfg["d"] // cfg["heads"])(
            a, a, use_causal_mask=True)
        m = L.Dense(4 * cfg["d"], activation="gelu")(L.LayerNormalization()(h))
        h = h + L.Dense(cfg["d"])(m)
      out = L.Dense(cfg["vocab"])(L.LayerNormalization()(h))
    else:
      inp = keras.Input((cfg["size"], cfg["size"], 3))
      h = L.ReLU()(L.BatchNormalization()(L.Conv2D(cfg["widths"][0], 3, padding="same")(inp)))
      for i, w in enumerate(cfg["widths"]):
        if i:
          h = L.AveragePooling2D(2)(h)
        for _ in range(cfg["blocks"]):
          r = L.ReLU()(L.BatchNormalization()(L.Conv2D(w, 3, padding="same")(h)))
          r = L.BatchNormalization()(L.Conv2D(w, 3, padding="same")(r))
          if h.shape[-1] != w:
            h = L.Conv2D(w, 1)(h)
          h = L.ReLU()(h + r)
      out = L.Dense(cfg["classes"])(L.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out)

  def make(use_ema: bool) -> Callable[[], Any]:
    keras.utils.set_random_seed(0)
    net = build()
    net.compile(
        optimizer=keras.optimizers.AdamW(LR, use_ema=use_ema, ema_momentum=DECAY),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lambda: net.train_on_batch(x, y)

  return [
      Case("no EMA", lambda: make(False), 0.0, sync=lambda _: None),
      Case("use_ema", lambda: make(True), 0.0, sync=lambda _: None),
  ]


def _threads() -> int:
  # XLA's CPU client sizes its thread pool by the CPUs this process may run on.
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _model_ema_v3() -> tuple[Any, str]:
  """timm's `ModelEmaV3` class, and where it came from.

  `import timm` imports torchvision, and PyPI's torchvision (pulled in by
  `pip install timm`) does not load beside the CPU torch wheel ("operator
  torchvision::nms does not exist"). `timm/utils/model_ema.py` itself imports
  only torch, so then it is loaded alone from the installed timm: the same
  class, the same code."""
  try:
    from timm.utils import ModelEmaV3

    return ModelEmaV3, "timm.utils.ModelEmaV3"
  except Exception as e:  # a broken torchvision raises RuntimeError, not ImportError
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
      raise
    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "model_ema.py")
    module_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
    if module_spec is None or module_spec.loader is None:
      raise
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelEmaV3, (
        f"ModelEmaV3 from the installed timm's utils/model_ema.py, loaded alone "
        f"(`import timm` failed: {type(e).__name__}: {str(e)[:80]})")


def torch_model(model: str, cfg: dict[str, Any]) -> Any:
  """The Linen/NNX model in PyTorch: the same layers, shapes and parameter
  count (NCHW images for the CNN)."""
  import torch
  from torch import nn as tnn

  class Block(tnn.Module):
    def __init__(self, d: int, heads: int):
      super().__init__()
      self.ln1, self.ln2 = tnn.LayerNorm(d), tnn.LayerNorm(d)
      self.attn = tnn.MultiheadAttention(d, heads, batch_first=True)
      self.up, self.down = tnn.Linear(d, 4 * d), tnn.Linear(4 * d, d)

    def forward(self, x: Any, mask: Any) -> Any:
      a = self.ln1(x)
      x = x + self.attn(a, a, a, attn_mask=mask, need_weights=False, is_causal=True)[0]
      # Flax's gelu is the tanh approximation.
      return x + self.down(tnn.functional.gelu(self.up(self.ln2(x)), approximate="tanh"))

  class LM(tnn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int):
      super().__init__()
      self.embed = tnn.Embedding(vocab, d)
      self.pos = tnn.Parameter(torch.randn(seq, d) * 0.02)
      self.blocks = tnn.ModuleList([Block(d, heads) for _ in range(layers)])
      self.ln, self.head = tnn.LayerNorm(d), tnn.Linear(d, vocab)
      # Not persistent: out of the state_dict, so not averaged by the EMA.
      self.register_buffer(
          "mask", torch.ones(seq, seq, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, tokens: Any) -> Any:
      t = tokens.shape[1]
      x, mask = self.embed(tokens) + self.pos[:t], self.mask[:t, :t]
      for block in self.blocks:
        x = block(x, mask)
      return self.head(self.ln(x))

  class ResBlock(tnn.Module):
    def __init__(self, cin: int, width: int):
      super().__init__()
      self.conv1, self.bn1 = tnn.Conv2d(cin, width, 3, padding=1), tnn.BatchNorm2d(width)
      self.conv2, self.bn2 = tnn.Conv2d(width, width, 3, padding=1), tnn.BatchNorm2d(width)
      self.proj = tnn.Conv2d(cin, width, 1) if cin != width else None

    def forward(self, x: Any) -> Any:
      y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
      return torch.relu((x if self.proj is None else self.proj(x)) + y)

  class CNN(tnn.Module):
    def __init__(self, widths: tuple[int, ...], blocks: int, classes: int):
      super().__init__()
      self.stem, self.bn = tnn.Conv2d(3, widths[0], 3, padding=1), tnn.BatchNorm2d(widths[0])
      layers, cin = [], widths[0]
      for w in widths:
        for _ in range(blocks):
          layers.append(ResBlock(cin, w))
          cin = w
      self.layers = tnn.ModuleList(layers)
      self.stage_starts = tuple(i * blocks for i in range(1, len(widths)))
      self.head = tnn.Linear(cin, classes)

    def forward(self, x: Any) -> Any:
      x = torch.relu(self.bn(self.stem(x)))
      for i, layer in enumerate(self.layers):
        if i in self.stage_starts:
          x = tnn.functional.avg_pool2d(x, 2)
        x = layer(x)
      return self.head(x.mean(dim=(2, 3)))

  if model == "lm":
    return LM(cfg["vocab"], cfg["d"], cfg["heads"], cfg["layers"], cfg["seq"])
  return CNN(tuple(cfg["widths"]), cfg["blocks"], cfg["classes"])


def timm_cases(model: str, cfg: dict[str, Any]) -> list[Case]:
  """The train step in PyTorch without EMA and with timm's `ModelEmaV3`;
  one skipped row, saying how to get the others, where torch or timm is
  missing."""
  try:
    import torch

    model_ema_v3, source = _model_ema_v3()
  except Exception as e:  # absent or broken: one skipped row, as documented
    case = Case("ModelEmaV3", lambda: lambda: None, 0.0)
    case.skipped = (
        f"torch/timm not importable ({type(e).__name__}); for these rows: "
        f"`pip install torch==2.13.0 timm` into the benchmark's environment ({sys.prefix})")
    return [case]
  gpu = jax.default_backend() == "gpu"
  if gpu and not torch.cuda.is_available():
    case = Case("ModelEmaV3", lambda: lambda: None, 0.0)
    case.skipped = "JAX runs on the GPU and this torch cannot: it would compare two devices"
    return [case]

  device = "cuda" if gpu else "cpu"
  threads = _threads()
  torch.set_num_threads(threads)
  x, y = (torch.from_numpy(np.array(a)).to(device) for a in batch(model, cfg))
  if model == "cnn":
    x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
  y = y.long()
  n_params = sum(p.numel() for p in torch_model(model, cfg).parameters())
  where = "CUDA" if gpu else (f"{threads} threads (torch.set_num_threads: as many as "
                              f"JAX's CPU client)")
  setup = (f"torch {torch.__version__}, eager, {where}; AdamW({LR}, weight_decay=1e-4); "
           f"{n_params} params")
  sync = (lambda _: torch.cuda.synchronize()) if gpu else (lambda _: None)

  def make(with_ema: bool) -> Callable[[], Any]:
    torch.manual_seed(0)
    net = torch_model(model, cfg).to(device).train()
    # optax.adamw's weight decay, so the update is the JAX groups' own.
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-4)
    ema = model_ema_v3(net, decay=DECAY) if with_ema else None
    count = itertools.count()

    def run() -> None:
      logits = net(x)
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
      loss.backward()
      opt.step()
      opt.zero_grad()
      if ema is not None:
        ema.update(net, step=next(count))

    return run

  ema_note = (
      f"ModelEmaV3(model, decay={DECAY}) with its defaults (use_warmup=False, "
      f"update_after_step=0, min_decay=0, foreach=True, exclude_buffers=False), "
      f"update(model, step=i): a copy at steps 0 and 1, then the constant decay "
      f"{DECAY}; it averages the buffers too (BatchNorm statistics, as average_stats); "
      f"the class: {source}")
  return [
      Case("no EMA", lambda: make(False), 0.0, note=setup, sync=sync),
      Case("ModelEmaV3", lambda: make(True), 0.0, note=f"{setup}; {ema_note}", sync=sync),
  ]


# --------------------------------------------------------------------------
# Running and reporting


def dispatch_time(case: Case, calls: int) -> None:
  """The host dispatch of a step: the time until the call returns, with the
  device idle before it (so it measures the host's work, not a queue)."""
  assert case.run is not None
  times = []
  for _ in range(calls):
    jax.block_until_ready(case.run())
    t0 = time.perf_counter()
    out = case.run()
    times.append(time.perf_counter() - t0)
    jax.block_until_ready(out)
  case.dispatch_s = statistics.median(times)  # type: ignore[attr-defined]


def records(model: str, framework: str, cases: list[Case], baseline: str) -> list[dict[str, Any]]:
  base = next((c for c in cases if c.name == baseline and c.samples), None)
  out = []
  for c in cases:
    r = {"model": model, "framework": framework, "case": c.name} | summary(c)
    r.pop("bytes", None), r.pop("gb_per_s", None)
    if hasattr(c, "dispatch_s"):
      r["dispatch_s"] = c.dispatch_s
    if "median_s" in r and base is not None:
      r["baseline"] = baseline
      r["ratio"] = r["median_s"] / statistics.median(base.samples)
      if "dispatch_s" in r and hasattr(base, "dispatch_s"):
        r["dispatch_ratio"] = r["dispatch_s"] / base.dispatch_s
    out.append(r)
  return out


def print_table(title: str, recs: list[dict[str, Any]]) -> None:
  print(f"\n### {title}")
  w = max(len(r["case"]) for r in recs) + 2
  print(f"{'case'.ljust(w)}{'median':>10}{'p25':>10}{'p75':>10}{'ratio':>8}{'dispatch':>10}")
  for r in recs:
    if "median_s" not in r:
      print(f"{r['case'].ljust(w)}skipped: {r['skipped']}")
      continue
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
    disp = fmt_time(r["dispatch_s"]) if "dispatch_s" in r else ""
    print(f"{r['case'].ljust(w)}{fmt_time(r['median_s']):>10}{fmt_time(r['p25_s']):>10}"
          f"{fmt_time(r['p75_s']):>10}{ratio:>8}{disp:>10}")
  for r in recs:
    if r.get("note"):
      print(f"  {r['case']}: {r['note']}")


FRAMEWORKS = ("linen", "nnx", "keras", "timm", "eval")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny models, 2 rounds")
  parser.add_argument("--out", help="JSON path (default benchmarks/results/models-<time>.json)")
  parser.add_argument("--rounds", type=int, help="interleaved rounds per group")
  parser.add_argument("--models", help="lm,cnn (default both; --smoke: cnn)")
  parser.add_argument(
      "--frameworks",
      help=f"groups to run, of {','.join(FRAMEWORKS)} (default all): linen, nnx, keras "
           "and timm are the train groups (nnx: every NNX pattern), eval the Linen and "
           "NNX evaluation groups; e.g. `--frameworks timm` for the timm rows alone")
  args = parser.parse_args(argv)
  frameworks = args.frameworks.split(",") if args.frameworks else list(FRAMEWORKS)
  unknown = sorted(set(frameworks) - set(FRAMEWORKS))
  if unknown:
    parser.error(f"--frameworks: unknown {unknown}; choose from {','.join(FRAMEWORKS)}")
  # Smoke mode runs every kind of case once, on the model that has them all
  # (BatchNorm statistics), in one NNX pattern: it checks the script, fast.
  models = (args.models or ("cnn" if args.smoke else "lm,cnn")).split(",")
  patterns = PATTERNS[:1] if args.smoke else PATTERNS
  configs = SMOKE if args.smoke else FULL
  rounds = args.rounds or (2 if args.smoke else 11)
  min_sample_s = 0.001 if args.smoke else 0.05
  calls = 2 if args.smoke else 21  # dispatch: the median of this many calls

  started = time.time()
  report = start(
      "ema_jax models benchmark", args.smoke,
      {"decay": DECAY, "update_every": EVERY, "rounds": rounds,
       "min_sample_s": min_sample_s, "optimizer": f"adamw({LR})",
       "configs": {m: configs[m] for m in models}, "nnx_patterns": patterns,
       "frameworks": frameworks, "dispatch_calls": calls},
      models={}, records=[], group_seconds={},
  )
  dispatch = functools.partial(dispatch_time, calls=calls)

  for model in models:
    cfg = configs[model]
    report["models"][model] = sizes(model, cfg)
    info = report["models"][model]
    print(f"\n## {model}: {info['params']} params in {info['param_leaves']} leaves "
          f"(median leaf {info['median_leaf']} elements)")
    # (which --frameworks selects it, framework, its cases, baseline, after)
    groups: list[tuple[str, str, Callable[[], list[Case]], str, Any]] = [
        ("linen", "linen (jax.jit, donated)", lambda: linen_train_cases(model, cfg),
         "no EMA", dispatch),
    ]
    groups += [("nnx", p, functools.partial(nnx_train_cases, model, cfg, p), "no EMA",
                dispatch) for p in patterns]
    groups += [
        ("keras", "keras 3 (jax backend, train_on_batch)", lambda: keras_train_cases(model, cfg),
         "no EMA", None),
        ("timm", "timm", lambda: timm_cases(model, cfg), "no EMA", None),
        ("eval", "linen eval", lambda: linen_eval_cases(model, cfg), "plain eval", None),
        ("eval", "nnx eval", lambda: nnx_eval_cases(model, cfg), "plain eval", None),
    ]
    for family, framework, build, baseline, after in groups:
      if family not in frameworks:
        continue
      cases = build()
      t0 = time.time()
      run_group(cases, rounds, min_sample_s, after=after)
      report["group_seconds"][f"{model}, {framework}"] = time.time() - t0
      recs = records(model, framework, cases, baseline)
      if framework == "nnx eval":  # the round trip against NNX's own floor
        floor = next(r for r in recs if r["case"].startswith("floor"))
        for r in recs:
          if r["case"].startswith(("round trip", "floor")) and "median_s" in r:
            r["baseline"], r["ratio"] = floor["case"], r["median_s"] / floor["median_s"]
      report["records"] += recs
      print_table(f"{model}, {framework}: ratio to {baseline or '-'}", recs)
    report["machine"][f"load_average_after_{model}"] = list(os.getloadavg())

  return finish(report, started, args.out, "models")

if __name__ == "__main__":
  sys.exit(main())
