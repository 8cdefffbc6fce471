"""Post-hoc EMA (Karras et al., EDM2): choose the EMA length after training.

Track two power-function EMAs during training (`Snapshotter.ema()`), save
both every few steps (`Snapshotter.maybe_save`), and afterwards `synthesize`
the EMA of any width `sigma_rel` at any snapshot step as a linear combination
of the snapshots, or `sweep` a list of widths and keep the best by your metric.

The step is counted in optimizer updates: a power-function EMA at step `t`
weighs the params of step `tau <= t` in proportion to `tau ** gamma`. Orbax
(`pip install orbax-checkpoint`, part of `ema_jax[flax]`) stores the snapshots.

References:
  Karras, Aittala, Lehtinen, Hellsten, Aila, Laine. Analyzing and Improving
  the Training Dynamics of Diffusion Models. CVPR 2024. Section 3 and
  Appendix C; `training/phema.py` in github.com/NVlabs/edm2.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import functools
import json
import math
import os
import socket
import tempfile
import threading
import warnings
from typing import Any, Callable, Literal, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ema_jax import _checks
from ema_jax import _ema
from ema_jax import _leaves
from ema_jax import _schedules
from ema_jax import _state
from ema_jax._leaves import Mask

__all__ = ["Snapshotter", "SweepResult", "solve_weights", "sweep", "synthesize"]

_FORMAT = "ema_jax.posthoc/2"
# What a directory's snapshots must share with a Snapshotter writing there.
_SETTINGS = ("gammas", "every", "update_every")
PathLike = Union[str, "os.PathLike[str]"]
Existing = Literal["refuse", "resume", "move_aside"]
# The writer's lock and ownership record, inside the directory (Orbax lists
# only step directories, so it never reads it as a snapshot).
_LOCK_NAME = ".ema_jax_writer.lock"


def _key_name(key: Any) -> str:
  """One path entry as Orbax writes it in a leaf name."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _orbax_name(path: Sequence[Any]) -> str:
  """A leaf's name in an Orbax checkpoint: its keys joined by dots."""
  return ".".join(map(_key_name, path))


def _check_orbax_names(tree: Any, what: str) -> None:
  """Refuse a tree two of whose leaves Orbax would store under one name.

  Orbax names a leaf by its keys joined with dots, so `{"a.b": x}` and
  `{"a": {"b": y}}` collide; it would then write one over the other.
  """
  seen: dict[str, Any] = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None
  )[0]:
    name = _orbax_name(path)
    if name in seen:
      raise ValueError(
          f"{what}: leaves {_leaves.path_str(seen[name])} and "
          f"{_leaves.path_str(path)} would both be stored as `{name}` (Orbax "
          "joins keys with dots), one over the other. Rename a key so that "
          "no key holds a dot another path spells out."
      )
    seen[name] = path


# The directories whose lock this process holds, by (device, inode). A second
# writer in this process is refused here, whatever the file system makes of
# two opens of one file: NFS emulates `flock` with POSIX locks, which never
# conflict within one process (and which closing any copy of the file drops).
_held: dict[tuple[int, int], "_WriterLock"] = {}
_held_mutex = threading.Lock()


class _WriterLock:
  """One writer per directory: an OS lock on a file holding the owner's record.

  `fcntl.flock` conflicts between any two opens of the file, in one process or
  two, and the kernel drops it when its process ends (however it ends), so a
  crashed run leaves no stale lock: the record it leaves is only read while
  someone holds the lock, and overwritten by the next writer. Within one
  process, `_held` refuses a second writer before the file is opened.
  """

  record: str  # the owner's record, as written in the file

  def __init__(self, directory: str):
    self.path = os.path.join(directory, _LOCK_NAME)
    with _held_mutex:
      try:
        info = os.stat(directory)
        self._key = (info.st_dev, info.st_ino)
        other = _held.get(self._key)
        if other is not None:
          raise _in_use(directory, other.record)
        self._file: Any = open(self.path, "a+")  # noqa: SIM115  # held until release
      except OSError as e:
        raise type(e)(
            e.errno, f"Cannot write to the snapshot directory {directory!r}: "
            f"{e.strerror}."
        ) from e
      try:
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        self._file.seek(0)
        record = self._file.read()
        self._file.close()
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise OSError(
              e.errno,
              f"Cannot lock {self.path!r} to make this Snapshotter the "
              f"directory's only writer ({e.strerror}); use a directory on a "
              "file system with file locks.",
          ) from e
        raise _in_use(directory, record) from None
      self.record = json.dumps({
          "pid": os.getpid(),
          "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
      })
      self._file.seek(0)
      self._file.truncate()
      self._file.write(self.record)
      self._file.flush()
      _held[self._key] = self

  def release(self) -> None:
    with _held_mutex:
      if _held.get(self._key) is self:
        del _held[self._key]
      if not self._file.closed:
        self._file.close()  # closing drops the flock


def _in_use(directory: str, record: str) -> ValueError:
  return ValueError(
      f"{directory!r} is in use by another Snapshotter: {_holder(record)}. A "
      "directory takes one writer at a time: close the other Snapshotter (or "
      "end its process), or give this run a new directory. A crashed run's "
      "lock is released by the OS when its process ends."
  )


def _forget_locks_in_child() -> None:
  """In a child forked by a writer: close its copies of the lock files.

  `flock` belongs to the open file, which `fork` shares with the child: a
  child that kept its copy would hold the lock after the parent closed (or
  ended) until the child ended. Closing the copy leaves the parent's lock as
  it is. The child's Snapshotters refuse every call (they check the pid).
  """
  global _held_mutex
  _held_mutex = threading.Lock()  # another thread may have held it at fork
  for lock in _held.values():
    lock._file.close()
  _held.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _holder(record: str) -> str:
  try:
    owner = json.loads(record)
    pid, host, started = owner["pid"], owner["host"], owner["started"]
  except (ValueError, KeyError, TypeError):
    return "a writer that has not recorded itself yet"
  mine = pid == os.getpid() and host == socket.gethostname()
  return (
      f"process {pid} on {host}, since {started}"
      + (" (this process: close() the other Snapshotter first)" if mine else "")
  )


def _raise_background_error(manager: Any, wait: bool) -> None:
  """Raise the failure of an asynchronous write of an Orbax manager, if any.

  Orbax's finalize thread takes its checkpointer's error, so that
  `check_for_errors` no longer sees it: only `wait_until_finished` raises it
  (once per calling thread). Without `wait` it is asked only once no write
  is in progress, so that the caller never waits for one.
  """
  if wait or not manager.is_saving_in_progress():
    manager.wait_until_finished()
  manager.check_for_errors()


def _failed_save(directory: str, what: str, error: BaseException) -> RuntimeError:
  """The error of a save that did not reach the disk: what, where and why."""
  return RuntimeError(
      f"{what} could not be written to {directory!r}: "
      f"{type(error).__name__}: {error}. Nothing of it is on disk; fix the "
      "cause (space, permissions, a directory removed) and save again, or "
      "resume from your latest checkpoint."
  )


def _gammas(
    sigma_rels: Sequence[float] | None, gammas: Sequence[float] | None
) -> tuple[float, ...]:
  if sigma_rels is not None and gammas is not None:
    raise ValueError("Give `sigma_rels` or `gammas`, not both.")
  if gammas is None:
    name, values = "sigma_rels", tuple((0.05, 0.10) if sigma_rels is None else sigma_rels)
    out = tuple(_schedules.sigma_rel_to_gamma(s) for s in values)
  else:
    name, values = "gammas", tuple(float(g) for g in gammas)
    out = values
    for g in out:
      _schedules.gamma_to_sigma_rel(g)  # raises for gamma <= -1
  if not out:
    raise ValueError("Track at least one power-function EMA (two are usual).")
  for i, g in enumerate(out):
    if g in out[:i]:
      raise ValueError(
          f"`{name}` holds {values[i]} twice: two EMAs of one width add "
          "nothing, and make the synthesis' least squares singular. Give "
          "distinct widths, e.g. `sigma_rels=(0.05, 0.10)`."
      )
  return out


def _widths(gammas: Sequence[float]) -> str:
  """Exponents shown as the widths a user gives: `(0.05, 0.1)`."""
  return str(tuple(round(_schedules.gamma_to_sigma_rel(g), 6) for g in gammas))


def _shown(meta: dict[str, Any], key: str) -> str:
  return _widths(meta["gammas"]) if key == "gammas" else str(meta[key])


def _difference(
    a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str,
    keys: Sequence[str],
) -> str | None:
  """The first setting or leaf path at which two snapshot records differ."""
  for key in keys:
    if key == "tree":
      found = _leaves.first_difference(a["tree"], b["tree"], a_name, b_name)
      if found:
        return found
    elif a[key] != b[key]:
      name = "sigma_rels" if key == "gammas" else key
      return (
          f"`{name}` is {_shown(a, key)} in {a_name} but {_shown(b, key)} in "
          f"{b_name}"
      )
  return None


def _read_meta(ocp: Any, manager: Any, directory: str, step: int) -> dict[str, Any]:
  restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  meta = dict(restored.meta)
  if meta.get("format") != _FORMAT:
    raise ValueError(
        f"{directory}/{step} is not an {_FORMAT} snapshot (format "
        f"{meta.get('format')!r}); snapshots of another ema_jax version "
        "record no tree to check them by. Write them again, or read them "
        "with the version that wrote them."
    )
  return meta


def _shown_steps(steps: Any) -> str:
  steps = sorted(steps)
  return ", ".join(map(str, steps)) if len(steps) <= 6 else (
      f"{steps[0]}, {steps[1]}, ..., {steps[-1]}: {len(steps)} snapshots")


def _gamma(sigma_rel: float | None, gamma: float | None) -> float:
  if (sigma_rel is None) == (gamma is None):
    raise ValueError("Give exactly one of `sigma_rel` and `gamma`.")
  return _gammas(
      None if sigma_rel is None else [sigma_rel],
      None if gamma is None else [gamma],
  )[0]


def _correlation(
    a_ofs: np.ndarray, a_exp: np.ndarray, b_ofs: np.ndarray, b_exp: np.ndarray
) -> np.ndarray:
  # EDM2's power_function_correlation (Eq. 151, Algorithm 3), on exponents.
  t_ratio = a_ofs / b_ofs
  t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
  t_max = np.maximum(a_ofs, b_ofs)
  num = (a_exp + 1) * (b_exp + 1) * t_ratio**t_exp
  den = (a_exp + b_exp + 1) * t_max
  return num / den


def solve_weights(
    in_steps: Any, in_gammas: Any, out_steps: Any, out_gammas: Any
) -> np.ndarray:
  """Least-squares weights that combine power-function EMAs into others.

  A port of EDM2's `solve_posthoc_coefficients` (Algorithm 3), in float64: the
  profile `(gamma + 1) tau**gamma / t**(gamma + 1)` on `[0, t]` of each output
  is projected onto the span of the input profiles, and each column is
  normalised to sum to 1 so that a constant is reproduced exactly.

  Args:
    in_steps: the step `t` of each input EMA (e.g. of each snapshot), > 0.
    in_gammas: the exponent of each input EMA, broadcast against `in_steps`.
    out_steps: the step of each wanted EMA.
    out_gammas: the exponent of each wanted EMA, broadcast against
      `out_steps`.

  Returns:
    A float64 array `[num_inputs, num_outputs]`: output `j` is
    `sum_i w[i, j] * input_i`.

  Examples:
    >>> import numpy as np, ema_jax
    >>> g1, g2 = ema_jax.sigma_rel_to_gamma(0.05), ema_jax.sigma_rel_to_gamma(0.10)
    >>> w = ema_jax.posthoc.solve_weights([1000, 1000], [g1, g2], 1000, g2)
    >>> w[:, 0].round(6)  # an input reproduces itself
    array([0., 1.])
  """
  in_steps, in_gammas = np.broadcast_arrays(in_steps, in_gammas)
  out_steps, out_gammas = np.broadcast_arrays(out_steps, out_gammas)
  rv = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
  cv = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
  if np.any(rv(in_steps) <= 0) or np.any(cv(out_steps) <= 0):
    raise ValueError("Steps must be > 0: a power-function EMA starts at step 1.")
  a = _correlation(rv(in_steps), rv(in_gammas), cv(in_steps), cv(in_gammas))
  b = _correlation(rv(in_steps), rv(in_gammas), cv(out_steps), cv(out_gammas))
  x = np.linalg.solve(a, b)
  return x / np.sum(x, axis=0)


def _stacked_sharding(sharding: Any) -> Any:
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  return sharding


def _saved_dtype(ema_dtype: Any, dtype: Any) -> np.dtype:
  """The dtype an average is saved in: `dtype`, or its complex counterpart."""
  if jnp.issubdtype(np.dtype(ema_dtype), jnp.complexfloating):
    return np.dtype(np.complex128 if np.dtype(dtype).itemsize >= 8 else np.complex64)
  return np.dtype(dtype)


def _as_saved(e: Any, dtype: np.dtype) -> Any:
  # Always a fresh buffer: the caller may donate its optimizer state to the
  # next step while Orbax still writes this one in the background.
  if _leaves.stored_kind(e) is _leaves.Kind.AVERAGE:
    return jnp.array(e, dtype=_saved_dtype(e.dtype, dtype), copy=True)
  return e if e is None else jnp.array(e, copy=True)


class Snapshotter:
  """Tracks power-function EMAs and saves them every `every` steps through Orbax.

  `ema()` gives the transformation to put last in your `optax.chain`: a
  `multi_ema` of one `power_decay` per width, with the step counted in
  optimizer updates and EDM2's `(1 - k / t) ** (gamma + 1)` when averaging
  every `k` updates. `maybe_save(opt_state)` after each step writes a snapshot
  of all the tracked EMAs at steps `every, 2 * every, ...`, in `dtype`. Each
  snapshot is an Orbax checkpoint (`directory/<step>`) holding the stacked
  averages, sharded as in training, and a JSON record of the step, the
  exponents, `every`, `update_every` and the tree (each leaf's path, shape
  and dtype), so `synthesize` needs nothing else and refuses snapshots that
  do not belong together. Saving is asynchronous by default; call
  `wait_until_finished()` or `close()` (or use `with`) before reading the
  snapshots from another process.

  `close()` also snapshots the last step given to `maybe_save` (or `save`)
  if it has no snapshot yet, so that a synthesis at the end of training
  covers the steps after the last multiple of `every`; with
  `update_every > 1`, the last step at which the EMAs were updated.

  One `Snapshotter` writes to a directory at a time: it holds an OS lock
  there (`fcntl.flock`, released by the kernel when its process ends, so a
  crashed run leaves nothing stuck) until `close()`; `maybe_save`, `save` and
  `close` may be called from several threads, not from a child process
  forked from the one that built it (the child's copy refuses every call).
  Under `jax.distributed`, every process of the run builds one and calls the
  same methods (process 0 holds the lock; each process writes its shards).
  The directory is local. What a SIGKILL leaves, and how to resume without
  losing a snapshot: docs/posthoc.md.

  Args:
    directory: where the snapshots go (created if missing). What to do with
      snapshots already there is `existing`'s choice. Resumed, they must have
      been written with the same `every`, `update_every` and widths
      (otherwise a `ValueError` says which setting differs) and of the same
      tree (checked at the first save). A step that already has a snapshot is
      not written again (each such step is compared with the snapshot on
      disk: another run's raises); a step below the latest one on
      disk that has none cannot be written (Orbax writes steps in order) and
      raises. See docs/posthoc.md.
    every: save every `every` optimizer updates; a multiple of
      `update_every`. More snapshots let a synthesized EMA follow the
      wanted profile more closely (and take more disk).
    sigma_rels: the widths to track, default `(0.05, 0.10)` as in EDM2.
    gammas: or the exponents instead of the widths.
    update_every: average every `update_every`-th update only (cheaper); the
      decay is compensated so the profiles do not change.
    dtype: the dtype of the saved averages, float32 by default. float16
      halves the disk but costs accuracy: its rounding is multiplied by the
      (large, alternating) weights of the synthesis.
    which: with several EMA states in the optimizer state, which one is the
      tracker (as in `ema_jax.ema_params`).
    async_save: write in a background thread (Orbax's asynchronous
      checkpointing).
    save_on_close: whether `close()` snapshots the last step seen (see
      above). `False` keeps the snapshots at multiples of `every` only. The
      Snapshotter holds a reference (no copy) to the last optimizer state it
      was given; if that state is donated before `close()`, `close()`
      raises: call `save(opt_state)` yourself before closing instead.
    existing: when `directory` holds snapshots: `"refuse"` (the default:
      a run from scratch never mixes its snapshots with another run's),
      `"resume"` (this run resumes the one that wrote them from its
      checkpoint), or `"move_aside"` (move them to
      `<directory>.moved-<UTC time>`, recorded in `moved_to`, and start
      afresh).

  Raises:
    ValueError: for bad settings; when another `Snapshotter` writes to
      `directory` (naming its process, host and start time); when the
      directory holds snapshots and `existing="refuse"`, or holds snapshots
      of other settings.
    OSError: when `directory` cannot be created or locked (the message names
      it and the cause).

  Examples:
    >>> import tempfile, jax.numpy as jnp, optax, ema_jax
    >>> directory = tempfile.mkdtemp()
    >>> snapshotter = ema_jax.posthoc.Snapshotter(directory, every=2)
    >>> tx = optax.chain(optax.sgd(0.1), snapshotter.ema())
    >>> params = {"w": jnp.zeros(2)}
    >>> opt_state = tx.init(params)
    >>> for step in range(1, 5):
    ...   updates, opt_state = tx.update({"w": -jnp.ones(2)}, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   saved = snapshotter.maybe_save(opt_state)
    >>> snapshotter.close()
    >>> snapshotter.steps
    (2, 4)
    >>> # A tracked width comes back as it was tracked:
    >>> ema = ema_jax.posthoc.synthesize(directory, sigma_rel=0.10)
    >>> ema["w"].round(4), ema_jax.ema_params(opt_state, index=1)["w"].round(4)
    (Array([0.3894, 0.3894], dtype=float32), Array([0.3894, 0.3894], dtype=float32))
  """

  def __init__(
      self,
      directory: PathLike,
      *,
      every: int,
      sigma_rels: Sequence[float] | None = None,
      gammas: Sequence[float] | None = None,
      update_every: int = 1,
      dtype: Any = jnp.float32,
      which: int | None = None,
      async_save: bool = True,
      save_on_close: bool = True,
      existing: Existing = "refuse",
  ):
    self.gammas = _gammas(sigma_rels, gammas)
    self.update_every = _checks.integer("update_every", update_every, 1)
    self.every = _checks.integer("every", every, 1)
    if self.every % self.update_every:
      raise ValueError(
          f"`every` ({self.every}) must be a multiple of `update_every` "
          f"({self.update_every}), so that each snapshot holds an EMA that is "
          "up to date."
      )
    try:
      self.dtype = np.dtype(dtype)
    except TypeError:
      raise TypeError(f"`dtype` is not a dtype: {dtype!r}.") from None
    if not jnp.issubdtype(self.dtype, jnp.floating):
      raise ValueError(f"`dtype` must be a floating dtype, got {self.dtype}.")
    if existing not in ("refuse", "resume", "move_aside"):
      raise ValueError(
          '`existing` must be "refuse", "resume" or "move_aside", got '
          f"{existing!r}."
      )
    self.which = which
    self.save_on_close = _checks.boolean("save_on_close", save_on_close)
    async_save = _checks.boolean("async_save", async_save)
    self.directory = os.fspath(directory)
    if "://" in self.directory:
      raise ValueError(
          f"`directory` must be a local path, got {self.directory!r}: the "
          "one-writer lock needs a file system with file locks (write the "
          "snapshots locally or to a mounted file system, and copy them)."
      )
    # Where `existing="move_aside"` put an earlier run's snapshots.
    self.moved_to: str | None = None
    # maybe_save, save and close may come from several threads.
    self._mutex = threading.RLock()
    self._closed = False
    # A child forked from this process shares the Snapshotter but not Orbax's
    # threads nor the lock: it is refused every call.
    self._pid = os.getpid()
    try:
      os.makedirs(self.directory, exist_ok=True)
    except OSError as e:
      raise type(e)(
          e.errno, f"Cannot create the snapshot directory {self.directory!r}: "
          f"{e.strerror}."
      ) from e
    # Under `jax.distributed` every process of the run opens the directory
    # (each writes its shards): process 0 holds the lock for them all.
    self._lock = _WriterLock(self.directory) if jax.process_index() == 0 else None
    ocp = _orbax()
    try:
      if existing == "move_aside":
        self._move_aside()
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None, create=True,
              enable_async_checkpointing=async_save,
          ),
      )
    except BaseException:
      self._release()
      raise
    # all_steps() lists finished snapshots only; this also has those under way.
    self._saved = set(self._manager.all_steps())
    # Snapshots of an earlier run: each one this run redoes is compared.
    self._unchecked = set(self._saved)
    # The latest snapshot an earlier run left, until this run's first step.
    self._resumed_after: int | None = max(self._saved, default=None)
    self._settings = {
        "gammas": list(self.gammas),
        "every": self.every,
        "update_every": self.update_every,
    }
    # The record of the latest snapshot: later ones must match its tree.
    self._latest: dict[str, Any] | None = None
    if self._saved:
      step = max(self._saved)
      try:
        if existing == "refuse":
          raise ValueError(
              f"{self.directory!r} holds the snapshots of another run (steps "
              f"{_shown_steps(self._saved)}); a new run must not mix its "
              "snapshots with them. Pass `existing=\"resume\"` if this run "
              "resumes the one that wrote them from its checkpoint, "
              "`existing=\"move_aside\"` to move them to a directory beside "
              "it first, or give this run a new directory."
          )
        self._latest = _read_meta(ocp, self._manager, self.directory, step)
        found = _difference(
            self._settings, self._latest, "this Snapshotter",
            f"the snapshots in {self.directory!r} (step {step})", _SETTINGS,
        )
        if found:
          raise ValueError(
              f"{found}. A directory holds the snapshots of one run: pass the "
              "settings it was written with, or give this run a new directory."
          )
      except BaseException:
        self._manager.close()
        self._release()
        raise
    # The tracker's EMA state at the last step given at which the EMAs were
    # updated, for close(): the tracker alone, never the optimizer state.
    self._last: tuple[int, _state.MultiEmaState] | None = None
    # Where the tracker sits in the optimizer state (found once).
    self._path: tuple[Any, ...] | None = None

  def _move_aside(self) -> None:
    """Move an earlier run's snapshots to `<directory>.moved-<time>`."""
    if jax.process_index() == 0:
      entries = [e for e in os.listdir(self.directory) if e != _LOCK_NAME]
      if entries:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y%m%dT%H%M%SZ")
        target = f"{self.directory.rstrip(os.sep)}.moved-{stamp}"
        n = 1
        while os.path.exists(target):
          n += 1
          target = f"{self.directory.rstrip(os.sep)}.moved-{stamp}-{n}"
        os.makedirs(target)
        for entry in entries:
          os.rename(os.path.join(self.directory, entry), os.path.join(target, entry))
        self.moved_to = target
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("ema_jax.posthoc.move_aside")

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.release()

  @property
  def sigma_rels(self) -> tuple[float, ...]:
    """The widths tracked, from `gammas`."""
    return tuple(_schedules.gamma_to_sigma_rel(g) for g in self.gammas)

  @property
  def steps(self) -> tuple[int, ...]:
    """The steps of the snapshots written so far (finished ones), ascending."""
    self._check_process()  # before the mutex: a thread may have held it at fork
    with self._mutex:
      self._manager.reload()
      return tuple(sorted(self._manager.all_steps()))

  def ema(
      self, *, ema_dtype: Any = None, mask: Mask = None
  ) -> optax.GradientTransformation:
    """The power-function EMAs to track, as a `multi_ema` to put last in a chain.

    Args:
      ema_dtype: the dtype of the averages, as in `ema_jax.ema`.
      mask: which floating leaves to average, as in `ema_jax.ema`.

    Returns:
      `ema_jax.multi_ema([power_decay(gamma=g) for g in self.gammas],
      update_every=self.update_every, ...)`, whose state records its
      `power_profile`: `maybe_save` and `save` take no other tracker.

    Examples:
      >>> import tempfile, jax.numpy as jnp, ema_jax
      >>> snapshotter = ema_jax.posthoc.Snapshotter(tempfile.mkdtemp(), every=10)
      >>> state = snapshotter.ema().init({"w": jnp.zeros(3)})
      >>> state.ema["w"].shape  # sigma_rel 0.05 and 0.10, stacked
      (2, 3)
    """
    return _ema.multi_ema(
        [_schedules.power_decay(gamma=g) for g in self.gammas],
        update_every=self.update_every,
        ema_dtype=ema_dtype,
        mask=mask,
    )

  def _tracked(self, opt_state: Any) -> _state.MultiEmaState:
    # The path is found once: maybe_save stays a few lookups per step.
    found = _at(opt_state, self._path) if self._path is not None else None
    if not isinstance(found, _state.MultiEmaState):
      which, found = _state.find(opt_state, self.which)
      self._path = _path_of(opt_state, which)
    if not isinstance(found, _state.MultiEmaState):
      raise ValueError(
          f"The EMA state found is a {type(found).__name__}, not the "
          "`MultiEmaState` of `Snapshotter.ema()`"
          + (" (swap back before saving)." if "Swapped" in type(found).__name__
             else "; pass `which=` to pick it.")
      )
    self._check_profile(found.power_profile)
    return found

  def _check_profile(self, profile: _state.PowerProfile | None) -> None:
    """The tracker must record this Snapshotter's power profile.

    Any `multi_ema` state looks like the tracker's; `synthesize` combines the
    snapshots as power profiles of `gammas`, so averages of other decays,
    widths or `update_every` would give a wrong EMA without a sign. The
    profile is static (in the state's tree structure): checking it costs no
    device transfer, at every call.
    """
    mine = f"sigma_rels {_widths(self.gammas)} with update_every={self.update_every}"
    if profile is None:
      found = (
          "records no power profile: its averages are not all power-function "
          "EMAs from the first update on (a `multi_ema` records one when every "
          "decay is a `power_decay`, with `start_step=0` and a Python int "
          "`update_every`; `ema_jax.reset` after an update, or an update by a "
          "`multi_ema` of other decays, drops it)"
      )
    elif len(profile.gammas) == len(self.gammas) and all(
        math.isclose(a, b, rel_tol=1e-9) for a, b in zip(profile.gammas, self.gammas)
    ) and profile.update_every == self.update_every:
      return
    else:
      found = (
          f"holds power-function EMAs of sigma_rels {_widths(profile.gammas)} "
          f"with update_every={profile.update_every}"
      )
    raise ValueError(
        f"The tracked multi-EMA {found}; this Snapshotter tracks {mine}, and "
        "`synthesize` would combine its snapshots as those. Build the "
        "tracker with `snapshotter.ema()` (and restore checkpoints into a "
        "template built with it)."
    )

  def _check_process(self) -> None:
    """Refuse a call in a child forked from the process that built this."""
    if os.getpid() != self._pid:
      raise ValueError(
          f"This Snapshotter of {self.directory!r} belongs to process "
          f"{self._pid}; process {os.getpid()} is a child forked from it, "
          "which cannot write there: the directory's lock and Orbax's "
          "threads stay with the parent. Save from the parent (a forked "
          "worker should hand its results back), or build a Snapshotter in "
          "the child once the parent has closed its own."
      )

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(
          f"This Snapshotter of {self.directory!r} is closed; build a new one "
          '(with `existing="resume"`) to write there again.'
      )

  def _remember(self, step: int, state: _state.MultiEmaState) -> None:
    """Keep the tracker of the last update step for close(), and no more.

    Between two updates (`update_every > 1`) the averages are those of the
    last update bit for bit (it does not touch them): the caller's current
    buffers are kept in place of the older ones, which can then be freed, so
    only the carried (integer) leaves of the update step stay alive.
    """
    if step % self.update_every == 0:
      self._last = (step, state)
    elif self._last is not None and self._last[0] == step - step % self.update_every:
      old = self._last[1]
      ema = jax.tree.map(
          lambda o, e: e if _leaves.stored_kind(e) is _leaves.Kind.AVERAGE else o,
          old.ema, state.ema, is_leaf=lambda x: x is None,
      )
      self._last = (self._last[0], old._replace(ema=ema))

  def maybe_save(self, opt_state: Any, step: int | None = None) -> bool:
    """Save a snapshot if the step is a multiple of `every`.

    Args:
      opt_state: the optimizer state holding the tracked EMAs.
      step: the number of optimizer updates done, if you have it as a Python
        int; otherwise it is read from the state (a device-to-host transfer
        each call). When a snapshot is due it is checked against the state.

    Returns:
      Whether a snapshot was written (with `async_save`: started, in a
      directory checked to take files, every earlier snapshot being on
      disk; a write that fails in the background is raised by the first
      call after it is over, or by the next snapshot's save, and never
      counted as written).

    Raises:
      RuntimeError: when the snapshot (or an earlier one still being
        written) cannot be written; the message names the step, the
        directory and the cause.
      ValueError: as `save`, after `close()`, and in a process forked from
        the one that built the Snapshotter.

    Warns:
      UserWarning: at a resumed run's first step, when snapshots of earlier
        steps are missing from the directory and can no longer be written
        (their write had not finished when the earlier run's process ended).

    Examples:
      >>> import tempfile, jax.numpy as jnp, ema_jax
      >>> snapshotter = ema_jax.posthoc.Snapshotter(tempfile.mkdtemp(), every=10)
      >>> state = snapshotter.ema().init({"w": jnp.zeros(3)})
      >>> snapshotter.maybe_save(state)  # step 0: nothing to save yet
      False
    """
    self._check_process()  # before the mutex: a thread may have held it at fork
    with self._mutex:
      self._check_open()
      self._raise_failed()
      state = self._tracked(opt_state)
      if step is None:
        step = int(state.count)
      if step <= 0:
        return False
      self._check_lost(step)
      self._remember(step, state)
      if step % self.every:
        return False
      return self._save(state, step) is not None

  def save(self, opt_state: Any) -> int | None:
    """Save a snapshot now, whatever the step.

    Args:
      opt_state: the optimizer state holding the tracked EMAs.

    Returns:
      The step saved, or `None` when this step already has a snapshot.

    Raises:
      ValueError: at step 0, or between two updates of the EMAs when
        `update_every > 1` (the snapshot would be stale), when the state
        holds no tracker of this snapshotter (a `multi_ema` state that does
        not record this Snapshotter's power profile: other decays, widths
        or `update_every`, or averages reset after an update; the message
        says which), when its tree differs from
        that of the snapshots in the directory, when two of its leaves
        would have one name in Orbax (`"a.b"` and `a/b`), when the step is
        below the latest snapshot's and has none (Orbax would not write
        it), after `close()`, or in a process forked from the one that
        built the Snapshotter.
      RuntimeError: as in `maybe_save`.

    Warns:
      UserWarning: as `maybe_save`, of snapshots lost for good.

    Examples:
      >>> import tempfile, jax.numpy as jnp, ema_jax
      >>> snapshotter = ema_jax.posthoc.Snapshotter(tempfile.mkdtemp(), every=10)
      >>> tx = snapshotter.ema()
      >>> params = {"w": jnp.zeros(3)}
      >>> _, state = tx.update(params, tx.init(params), params)
      >>> snapshotter.save(state), snapshotter.save(state)
      (1, None)
      >>> snapshotter.close()
    """
    self._check_process()  # before the mutex: a thread may have held it at fork
    with self._mutex:
      self._check_open()
      self._raise_failed()
      state = self._tracked(opt_state)
      self._check_lost(int(state.count))
      return self._save(state, None)

  def _check_lost(self, step: int) -> None:
    """Warn, at a resumed run's first step, of snapshots lost for good.

    A snapshot whose write had not finished when the earlier run's process
    ended is not on disk; a run resumed from a checkpoint after its step
    cannot write it again (the EMAs of that step are gone).
    """
    latest, self._resumed_after = self._resumed_after, None
    if latest is None or step <= latest:
      return
    lost = range((latest // self.every + 1) * self.every, step, self.every)
    if lost:
      warnings.warn(
          f"The snapshots of step {_shown_steps(lost)} are not in "
          f"{self.directory!r}: the earlier run ended before writing them, "
          f"and this run starts after them (step {step}), so they cannot be "
          "written again; `synthesize` uses the others (a coarser fit). To "
          f"have them, resume from a checkpoint at or before step {lost[0]}. "
          "Call `snapshotter.wait_until_finished()` before saving each "
          "checkpoint, so that no checkpoint finishes before the snapshots "
          "it follows.",
          stacklevel=3,
      )

  def _raise_failed(self, wait: bool = False) -> None:
    """Raise the failure of a snapshot written in the background, if any.

    Without `wait`, a write under way is not waited for (it is asked again
    at the next call). Which steps failed is read from the disk: a step
    started and not there.
    """
    try:
      _raise_background_error(self._manager, wait)
    except Exception as e:
      # The failed steps are not on disk: forget them, so they can be redone.
      self._manager.reload()
      lost = self._saved - set(self._manager.all_steps())
      if not lost:
        return  # an error already raised, raised again to another thread
      self._saved -= lost
      self._last = None
      raise _failed_save(
          self.directory, f"The snapshot of step {_shown_steps(lost)}", e
      ) from e

  def _save(self, state: _state.MultiEmaState, expected: int | None) -> int | None:
    step = int(state.count)
    if expected is not None and expected != step:
      raise ValueError(
          f"`step={expected}` but the EMA state has seen {step} updates. Pass "
          "the number of optimizer updates (under `optax.MultiSteps`, the "
          "real updates, not micro-steps), or leave `step` out."
      )
    if step <= 0 or step % self.update_every:
      raise ValueError(
          f"Cannot snapshot at step {step}: "
          + ("no update yet." if step <= 0 else
             f"the EMAs were last updated at step "
             f"{step - step % self.update_every} (`update_every="
             f"{self.update_every}`).")
      )
    self._last = (step, state)
    meta = {
        "format": _FORMAT,
        "step": step,
        **self._settings,
        "dtype": self.dtype.name,
        "tree": _leaves.describe(state.ema, stacked=True),
    }
    if self._latest is not None:
      found = _difference(
          meta, self._latest, f"the EMA state of step {step}",
          f"the snapshot of step {self._latest['step']} in "
          f"{self.directory!r}", ("tree",),
      )
      if found:
        raise ValueError(
            f"Cannot snapshot step {step}: {found}. A directory holds the "
            "snapshots of one model: give this one a new directory."
        )
    if step in self._saved:
      if step in self._unchecked:
        self._check_redone(state, step)
      return None
    latest = max(self._saved, default=0)
    if step < latest:
      raise ValueError(
          f"Cannot snapshot step {step}: the latest snapshot in "
          f"{self.directory!r} is of step {latest}, and Orbax writes only "
          "steps after the latest. Resume training from a checkpoint (the "
          "snapshots of the steps it redoes are kept), or give a run that "
          "starts again a new directory."
      )
    ocp = _orbax()
    if self._latest is None:
      _check_orbax_names({"ema": state.ema}, "Cannot snapshot this EMA state")
    tree = jax.tree.map(
        lambda e: _as_saved(e, self.dtype), state.ema,
        is_leaf=lambda x: x is None,
    )
    # Orbax waits for the write under way before it starts this one, and
    # raises that write's failure: raised here, for the step that failed.
    self._raise_failed(wait=True)
    try:
      # Orbax creates the step's directory in the background: a directory
      # that cannot take it fails here, before the save is reported.
      with tempfile.TemporaryFile(dir=self.directory):
        pass
      started = self._manager.save(
          step,
          args=ocp.args.Composite(
              # Wrapped: Orbax's standard handler refuses a bare array.
              ema=ocp.args.StandardSave({"ema": tree}),
              meta=ocp.args.JsonSave(meta),
          ),
      )
    except OSError as e:
      raise _failed_save(self.directory, f"The snapshot of step {step}", e) from e
    if not started:  # Orbax's own policy refused it: never report it saved
      raise RuntimeError(
          f"Orbax did not write the snapshot of step {step} to "
          f"{self.directory!r} (its CheckpointManager refused the step)."
      )
    self._saved.add(step)
    self._latest = meta
    return step

  def _check_redone(self, state: _state.MultiEmaState, step: int) -> None:
    """The EMAs of a step that an earlier run snapshotted must be that snapshot.

    A run resumed from a checkpoint redoes the steps after it and finds the
    same EMAs (up to nondeterministic reductions); a run that starts again
    from step 1 with other data or seeds finds others, and its snapshots
    would be mixed with the earlier run's.
    """
    # Each redone step once: a resumed run redoes the few after its
    # checkpoint; a run that is not the one resumed fails at its first.
    self._unchecked.discard(step)
    ocp = _orbax()
    target = jax.tree.map(
        lambda e: jax.ShapeDtypeStruct(
            e.shape,
            _saved_dtype(e.dtype, self.dtype) if _leaves.is_float(e)
            else _leaves.leaf_dtype(e),
            sharding=e.sharding,
        ),
        state.ema,
    )
    saved = self._manager.restore(
        step, args=ocp.args.Composite(ema=ocp.args.StandardRestore({"ema": target}))
    ).ema["ema"]
    tolerance = max(1e-3, 10 * float(jnp.finfo(self.dtype).eps))
    flat = jax.tree_util.tree_flatten_with_path(state.ema)[0]
    for (path, e), disk in zip(flat, jax.tree.leaves(saved)):
      if not _leaves.is_float(e):
        continue
      dtype = _leaves.compute_dtype(e.dtype)
      a, b = e.astype(dtype), disk.astype(dtype)
      # An all-zero leaf matches zeros (not 0 / 0).
      norm = jnp.maximum(jnp.mean(jnp.abs(b) ** 2), jnp.finfo(dtype).tiny)
      ratio = jnp.sqrt(jnp.mean(jnp.abs(a - b) ** 2) / norm)
      # A replicated scalar: this process's copy (others' are not addressable).
      gap = float(ratio.addressable_data(0))
      if not gap <= tolerance:
        raise ValueError(
            f"The snapshot of step {step} in {self.directory!r} is not this "
            f"run's EMA at step {step} (leaf {_leaves.path_str(path)} differs "
            f"by {gap:.3g}, relative RMS): the directory holds the snapshots "
            "of another run. A run that starts again needs a new directory; "
            "a run resumed from a checkpoint redoes the snapshots it finds."
        )

  def wait_until_finished(self) -> None:
    """Block until every snapshot started is on disk.

    Raises:
      RuntimeError: when one could not be written (see `maybe_save`).
      ValueError: in a process forked from the one that built it.

    Examples:
      >>> import tempfile, ema_jax
      >>> ema_jax.posthoc.Snapshotter(tempfile.mkdtemp(), every=10).wait_until_finished()
    """
    self._check_process()  # before the mutex: a thread may have held it at fork
    with self._mutex:
      if self._closed:
        return  # close() waited
      self._raise_failed(wait=True)

  def close(self) -> None:
    """Snapshot the last step seen if it has none, finish writing, release Orbax.

    The last step is the last one given to `maybe_save` or `save` at which
    the EMAs were updated; nothing is written with `save_on_close=False`, or
    when it already has a snapshot. Leaving a `with` block on an exception
    closes without this snapshot. Orbax and the directory's lock are
    released in every case; closing twice does nothing.

    Raises:
      ValueError: when the last state seen has been donated since (save
        the final state with `save(opt_state)` before closing), or is below
        the latest snapshot on disk (see `save`), and in a process forked
        from the one that built it.
      RuntimeError: when a snapshot could not be written (see `maybe_save`).

    Examples:
      >>> import tempfile, jax.numpy as jnp, ema_jax
      >>> snapshotter = ema_jax.posthoc.Snapshotter(tempfile.mkdtemp(), every=10)
      >>> tx = snapshotter.ema()
      >>> params = jnp.zeros(3)
      >>> state = tx.init(params)
      >>> for step in range(1, 16):
      ...   _, state = tx.update(params, state, params)
      ...   _ = snapshotter.maybe_save(state, step=step)
      >>> snapshotter.wait_until_finished()
      >>> snapshotter.steps
      (10,)
      >>> snapshotter.close()  # the tail, steps 11 to 15
      >>> snapshotter.steps
      (10, 15)
    """
    self._close(tail=self.save_on_close)

  def _close(self, tail: bool) -> None:
    self._check_process()  # before the mutex: a thread may have held it at fork
    with self._mutex:
      if self._closed:
        return
      try:
        self._raise_failed(wait=True)
        if tail and self._last is not None and self._last[0] not in self._saved:
          step, state = self._last
          if any(
              isinstance(x, jax.Array) and x.is_deleted()
              for x in jax.tree.leaves(state)
          ):
            raise ValueError(
                f"`close()` cannot snapshot the last step seen ({step}): its "
                "EMA state has been donated since. Call "
                "`snapshotter.save(opt_state)` with the final state before "
                "`close()`, or build the Snapshotter with `save_on_close=False`."
            )
          self._save(state, step)
        self._raise_failed(wait=True)
      finally:
        # Whatever failed above: Orbax's threads end and the lock is dropped,
        # so that the process can exit and another writer take over.
        self._closed = True
        self._last = None
        try:
          self._manager.close()
        except Exception:
          pass  # its error was raised above, or is being raised
        finally:
          self._release()

  def __enter__(self) -> "Snapshotter":
    return self

  def __exit__(self, exc_type: Any, *exc: Any) -> None:
    self._close(tail=self.save_on_close and exc_type is None)


def _path_of(tree: Any, which: int) -> tuple[Any, ...]:
  """The key path of EMA state number `which` in an optax state."""
  found = [
      path for path, s in jax.tree_util.tree_flatten_with_path(
          tree, is_leaf=_state.is_state)[0]
      if _state.is_state(s)
  ]
  return tuple(found[which])


def _at(tree: Any, path: tuple[Any, ...]) -> Any:
  """The subtree at `path` (`None` when the tree no longer has it)."""
  for key in path:
    try:
      if isinstance(key, jax.tree_util.GetAttrKey):
        tree = getattr(tree, key.name)
      elif isinstance(key, jax.tree_util.SequenceKey):
        tree = tree[key.idx]
      elif isinstance(key, jax.tree_util.DictKey):
        tree = tree[key.key]
      else:
        return None
    except (AttributeError, IndexError, KeyError, TypeError):
      return None
  return tree


def _orbax() -> Any:
  try:
    import orbax.checkpoint as ocp
  except ImportError:
    raise ImportError(
        "ema_jax.posthoc saves snapshots with Orbax: `pip install "
        "orbax-checkpoint` (or ema_jax's `flax` extra: `pip install '.[flax]'` "
        "in a clone)."
    ) from None
  return ocp


class _Reader:
  """The snapshots of one directory: their records, and one at a time."""

  def __init__(self, snapshots: Any):
    if isinstance(snapshots, Snapshotter):
      snapshots.wait_until_finished()
      snapshots = snapshots.directory
    if not isinstance(snapshots, (str, os.PathLike)):
      raise TypeError(
          "`snapshots` must be a directory written by `Snapshotter` (or the "
          f"Snapshotter), got {type(snapshots).__name__}."
      )
    self.directory = os.fspath(snapshots)
    if not os.path.isdir(self.directory):
      raise ValueError(f"`snapshots`: no directory {self.directory!r}.")
    self._ocp = _orbax()
    self._manager = self._ocp.CheckpointManager(self.directory)
    self.meta: dict[int, dict[str, Any]] = {
        step: _read_meta(self._ocp, self._manager, self.directory, step)
        for step in sorted(self._manager.all_steps())
    }
    if not self.meta:
      raise ValueError(
          f"No snapshots in {self.directory!r}: call `Snapshotter.maybe_save` "
          "during training (and `close()` it before synthesizing)."
      )
    first, *others = self.meta
    for step in others:
      found = _difference(
          self.meta[step], self.meta[first], f"the snapshot of step {step}",
          f"that of step {first}", ("gammas", "tree"),
      )
      if found:
        raise ValueError(
            f"The snapshots in {self.directory!r} do not belong together: "
            f"{found}. A directory must hold the snapshots of one model and "
            "one set of widths; move the others to a directory of their own."
        )

  def target(self, step: int, like: Any) -> Any:
    """Orbax's restore target for snapshot `step`, shaped and sharded after `like`."""
    if like is None:
      return None
    meta = self.meta[step]
    leaves, treedef = jax.tree.flatten(like, is_leaf=lambda x: x is None)
    rows = _leaves.describe(like, stacked=False)
    for row, saved in zip(rows, meta["tree"]):
      if saved[1] == _leaves.Kind.SKIP.value or row[1] == _leaves.Kind.SKIP.value:
        row[1:] = saved[1:]  # nothing is restored there: anything will do
      elif row[1] == saved[1] == _leaves.Kind.AVERAGE.value:
        # An average comes back in the snapshots' dtype, whatever the
        # params' precision; only real against complex matters.
        complex_ = [jnp.issubdtype(np.dtype(d), jnp.complexfloating)
                    for d in (row[3], saved[3])]
        if complex_[0] == complex_[1]:
          row[3] = saved[3]
    found = _leaves.first_difference(rows, meta["tree"], "`like`", "the snapshots")
    if found:
      raise ValueError(
          f"`like` is not the tree the snapshots were taken of: {found}. Pass "
          "the params (or their `jax.ShapeDtypeStruct`s) of the model that "
          "was trained."
      )
    n = len(meta["gammas"])
    out: list[Any] = []
    for leaf, saved in zip(leaves, meta["tree"]):
      if saved[1] == _leaves.Kind.SKIP.value or leaf is None:
        out.append(None)
        continue
      sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(
          jax.devices()[0]
      )
      shape, dtype = jnp.shape(leaf), _leaves.leaf_dtype(leaf)
      if saved[1] == _leaves.Kind.AVERAGE.value:
        out.append(jax.ShapeDtypeStruct(
            (n, *shape), _saved_dtype(saved[3], meta["dtype"]),
            sharding=_stacked_sharding(sharding),
        ))
      else:
        out.append(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    return jax.tree.unflatten(treedef, out)

  def restore(self, step: int, like: Any) -> Any:
    target = self.target(step, like)
    restore = (
        self._ocp.args.StandardRestore()
        if target is None
        else self._ocp.args.StandardRestore({"ema": target})
    )
    return self._manager.restore(
        step, args=self._ocp.args.Composite(ema=restore)
    ).ema["ema"]

  def close(self) -> None:
    self._manager.close()


@jax.jit
def _combine(stacks: list[jax.Array], w: jax.Array) -> list[jax.Array]:
  # Per leaf one product with the weights broadcast along the stacked axis and
  # one sum over it: a few operations to trace and compile, whatever the
  # number of averages (indexing each average costs two per average and leaf).
  weights = {dtype: w.astype(dtype)
             for dtype in {_leaves.compute_dtype(s.dtype) for s in stacks}}
  out = []
  for s in stacks:
    wd = weights[_leaves.compute_dtype(s.dtype)]
    stack = s.astype(wd.dtype)
    out.append(jnp.sum(jax.lax.broadcast_in_dim(wd, s.shape, (0,)) * stack, axis=0))
  return out


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(
    acc: list[jax.Array], stacks: list[jax.Array], w: jax.Array
) -> list[jax.Array]:
  return [a + c for a, c in zip(acc, _combine(stacks, w))]


def _synthesize(
    reader: _Reader, gamma: float, step: int | None, like: Any
) -> Any:
  steps = sorted(reader.meta)
  if step is None:
    step = steps[-1]
  if step not in reader.meta:
    raise ValueError(
        f"`step={step}` has no snapshot; the snapshot steps are {steps} "
        "(EDM2 synthesizes at a snapshot step: later steps are not recorded)."
    )
  used = [s for s in steps if s <= step]
  in_steps = [s for s in used for _ in reader.meta[s]["gammas"]]
  in_gammas = [g for s in used for g in reader.meta[s]["gammas"]]
  if len(in_gammas) == 1 and not math.isclose(gamma, in_gammas[0], rel_tol=1e-9):
    raise ValueError(
        f"Up to step {step} there is one snapshot of one width (sigma_rel="
        f"{_schedules.gamma_to_sigma_rel(in_gammas[0]):.4g}): it cannot be "
        f"made into sigma_rel={_schedules.gamma_to_sigma_rel(gamma):.4g}. "
        "Synthesize at a later step (more snapshots), or track two widths "
        "(the default `sigma_rels=(0.05, 0.10)`)."
    )
  weights = solve_weights(in_steps, in_gammas, step, gamma)[:, 0]
  offsets = np.cumsum([0] + [len(reader.meta[s]["gammas"]) for s in used])

  acc: list[jax.Array] | None = None
  for k, s in enumerate(used):
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        reader.restore(s, like), is_leaf=lambda x: x is None
    )
    # By path (the reader checked that every snapshot has the same ones).
    leaves = {_leaves.path_str(path): e for path, e in flat}
    del flat
    if k == 0:
      paths = list(leaves)
      stacked = [
          i for i, p in enumerate(paths)
          if _leaves.stored_kind(leaves[p]) is _leaves.Kind.AVERAGE
      ]
    stacks = [leaves[paths[i]] for i in stacked]
    # Carried (integer) leaves come from the last snapshot, the one of `step`.
    out = [None if i in stacked else leaves[p] for i, p in enumerate(paths)]
    # Hold one snapshot at a time: drop it before reading the next.
    del leaves
    w = jnp.asarray(weights[offsets[k]:offsets[k + 1]], jnp.float32)
    acc = _combine(stacks, w) if acc is None else _accumulate(acc, stacks, w)
    del stacks
  assert acc is not None
  for i, a in zip(stacked, acc):
    out[i] = a
  return jax.tree.unflatten(treedef, out)


def synthesize(
    snapshots: PathLike | Snapshotter,
    sigma_rel: float | None = None,
    *,
    gamma: float | None = None,
    step: int | None = None,
    like: Any = None,
) -> Any:
  """The power-function EMA of any width at a snapshot step, from the snapshots.

  Solves EDM2's least squares for the weights of the snapshots taken up to
  `step` (in float64, `solve_weights`) and adds the weighted snapshots up leaf
  by leaf on the devices, reading one snapshot at a time (Orbax restores it
  with the shardings it was saved with, or those of `like`), so memory holds
  the result and one snapshot, whatever their number. The sum is computed in
  float32 (or the snapshot dtype, if wider).

  Args:
    snapshots: the directory a `Snapshotter` wrote, or the Snapshotter.
    sigma_rel: the width of the EMA wanted, in (0, 0.2887); EDM2 finds good
      values between 0.05 and 0.25.
    gamma: or its exponent.
    step: a snapshot step; default the last one.
    like: optional, the params (or `jax.ShapeDtypeStruct`s with shardings) of
      the model: the result then has their tree structure and shardings (the
      snapshots are restored with those shardings). Without it, the
      snapshots' own shardings and Orbax's containers (dicts, lists) are used.

  Returns:
    A tree like the params: floating leaves are the synthesized EMA (float32
    with float32 snapshots), integer leaves the values saved at `step`, masked
    leaves `None`.

  Raises:
    ValueError: for a `step` without snapshot, a bad width, snapshots that
      do not belong together (their trees or widths differ: the message
      names the leaf path or setting), a width other than the tracked one
      from a single snapshot of a single width, or `like` with other leaf
      paths or shapes than the snapshots.

  Examples:
    >>> import tempfile, jax.numpy as jnp, optax, ema_jax
    >>> directory = tempfile.mkdtemp()
    >>> with ema_jax.posthoc.Snapshotter(directory, every=10) as snapshotter:
    ...   tx = snapshotter.ema()  # sigma_rel 0.05 and 0.10
    ...   params = jnp.zeros(2)
    ...   state = tx.init(params)
    ...   for step in range(100):
    ...     params = params + 1.0  # the params after update t are t
    ...     _, state = tx.update(jnp.zeros(2), state, params)
    ...     _ = snapshotter.maybe_save(state)
    >>> # The power EMA of width 0.2 (gamma 1.83) weighs step tau by about
    >>> # tau**gamma, so it lags behind t = 100; tracking it during training
    >>> # would give 74.36, and ten snapshots of two narrower EMAs give:
    >>> ema_jax.posthoc.synthesize(directory, sigma_rel=0.2).round(2)
    Array([74.85, 74.85], dtype=float32)
    >>> # At step 50 from five snapshots (tracking it would give 37.43):
    >>> ema_jax.posthoc.synthesize(directory, sigma_rel=0.2, step=50).round(2)
    Array([38.37, 38.37], dtype=float32)
  """
  target = _gamma(sigma_rel, gamma)
  reader = _Reader(snapshots)
  try:
    return _synthesize(reader, target, step, like)
  finally:
    reader.close()


class SweepResult(NamedTuple):
  """What `sweep` found.

  Attributes:
    best_sigma_rel: the width with the best score.
    best_score: its score.
    scores: every width tried, mapped to its score, in the order given.
    best_params: the synthesized EMA of the best width.

  Examples:
    >>> from ema_jax.posthoc import SweepResult
    >>> result = SweepResult(0.1, 0.93, {0.05: 0.91, 0.1: 0.93}, best_params=None)
    >>> result.best_sigma_rel, max(result.scores, key=result.scores.get)
    (0.1, 0.1)
  """

  best_sigma_rel: float
  best_score: float
  scores: dict[float, float]
  best_params: Any


def sweep(
    snapshots: PathLike | Snapshotter,
    sigma_rels: Sequence[float],
    metric: Callable[[Any], float],
    *,
    step: int | None = None,
    like: Any = None,
    higher_is_better: bool = True,
) -> SweepResult:
  """Synthesize the EMA of each width, score it with `metric`, keep the best.

  The EMA-length search of EDM2 (their Fig. 5): `metric(params)` is your
  validation accuracy, loss or FID. Widths are synthesized one at a time, so
  memory holds at most the best EMA, the current one and one snapshot.

  Args:
    snapshots: the directory a `Snapshotter` wrote, or the Snapshotter.
    sigma_rels: the widths to try, each in (0, 0.2887).
    metric: a function of the params returning a number.
    step: a snapshot step; default the last one.
    like: as in `synthesize`.
    higher_is_better: `True` for accuracies, `False` for losses.

  Returns:
    A `SweepResult`.

  Examples:
    >>> import tempfile, jax.numpy as jnp, ema_jax
    >>> directory = tempfile.mkdtemp()
    >>> with ema_jax.posthoc.Snapshotter(directory, every=10) as snapshotter:
    ...   tx = snapshotter.ema()
    ...   params = jnp.zeros(())
    ...   state = tx.init(params)
    ...   for step in range(100):
    ...     params = params + 1.0
    ...     _, state = tx.update(jnp.zeros(()), state, params)
    ...     _ = snapshotter.maybe_save(state)
    >>> # The EMA closest to 90: longer EMAs lag more behind t = 100.
    >>> result = ema_jax.posthoc.sweep(
    ...     directory, [0.05, 0.1, 0.2], lambda p: -abs(float(p) - 90.0))
    >>> result.best_sigma_rel, round(float(result.best_params), 1)
    (0.1, 89.3)
  """
  values = [float(s) for s in sigma_rels]
  if not values:
    raise ValueError("`sigma_rels` is empty; give the widths to try.")
  gammas = [_gamma(s, None) for s in values]
  reader = _Reader(snapshots)
  sign = 1.0 if higher_is_better else -1.0
  scores: dict[float, float] = {}
  best: tuple[float, float, Any] | None = None
  try:
    for s, g in zip(values, gammas):
      params = _synthesize(reader, g, step, like)
      score = float(metric(params))
      scores[s] = score
      if best is None or (not math.isnan(score) and (
          math.isnan(best[1]) or sign * score > sign * best[1])):
        best = (s, score, params)
      del params
  finally:
    reader.close()
  assert best is not None
  return SweepResult(best[0], best[1], scores, best[2])
