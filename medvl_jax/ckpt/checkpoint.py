"""Orbax checkpointing: async saves of the train state and the data-iterator position.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds two items:
  state  the TrainState (params, batch_stats, optimizer state, step), restored with the target
         shardings of the current mesh;
  data   JSON with the input position (global batches consumed) and the seed, so a resumed run
         reads exactly the batches an uninterrupted one would.
The workdir may be a local path or a gs:// URL (`medvl_jax.paths`). Orbax commits a step
atomically: locally it writes a temporary directory and renames it when complete; on GCS, which
cannot rename, it writes `<step>/` in place and `<step>/commit_success.txt` last. Either way a
run killed mid-write leaves no step that Orbax lists, and the steps here are only ever the ones
Orbax lists as committed (never digit-named directories alone). Kept: the latest
`keep_checkpoints` steps plus the best one by validation loss.

Non-finite values: `save` refuses a state with a NaN/inf leaf (unless `allow_nonfinite`), and a
non-finite validation loss is not recorded as the step's metric, so the per-step metrics file
(`<step>/metrics/metrics`, JSON) never holds a bare `NaN` and such a step is never "best"; a
metric that is not finite anyway (written by an older version) ranks as +inf, i.e. worst.

A resumed run restores the newest *good* step (`restore_newest_good`): a damaged step (empty
directory, missing item, unreadable `state/_METADATA`, missing or truncated array file) is
named in one warning, moved to `<workdir>/checkpoints_damaged/` (copied, then removed, on
GCS), and the previous step is
used; when no step is usable the run stops with one line (`CheckpointError`). A save that
fails (e.g. a full disk) raises `CheckpointError` naming the step, its path and the last good
step, so training stops instead of running on without checkpoints.
"""

from collections.abc import Callable
import errno
import json
import math
import pathlib
import re
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from medvl_jax import paths
from medvl_jax.errors import CheckpointError

VAL_LOSS = "val_loss"
DAMAGED_DIR = "checkpoints_damaged"  # <workdir>/checkpoints_damaged/<step>-<utc time>
ITEMS = ("state", "data")


def _val_loss(metrics: dict) -> float:
  """The ranking metric; a non-finite or missing value ranks last (NaN would sort anywhere)."""
  value = float(metrics.get(VAL_LOSS, math.inf))
  return value if math.isfinite(value) else math.inf


def manager(
  workdir: str | pathlib.Path,
  keep: int = 2,
  read_only: bool = False,
  on_commit: Callable[[], None] | None = None,
) -> ocp.CheckpointManager:
  """The Orbax manager of `<workdir>/checkpoints` (a local path or a URL).

  `on_commit`: called from Orbax's background thread when an async save is finalised (just
  before the step is committed).
  """
  preservation = ocm.AnyPreservationPolicy(
    [
      ocm.LatestN(n=keep),
      # BestN sorts by the metric and keeps the tail: reverse=True keeps the lowest val_loss.
      ocm.BestN(
        get_metric_fn=_val_loss,
        reverse=True,
        n=1,
        keep_checkpoints_without_metrics=False,
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=preservation,
    best_fn=_val_loss,
    best_mode="min",
    enable_async_checkpointing=True,
    read_only=read_only,
    create=not read_only,
    async_options=ocp.AsyncOptions(post_finalization_callback=on_commit) if on_commit else None,
  )
  directory = paths.path(paths.join(paths.absolute(workdir), "checkpoints"))
  # Handlers named up front, so tools (export, evaluate) can restore without a target tree.
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_state: dict,
  val_loss: float | None = None,
  allow_nonfinite: bool = False,
) -> None:
  """Starts an async save of `state` and `data_state` at `step`.

  CheckpointError (one line) also if this or the previous async save failed.

  Raises:
    CheckpointError: `state` has a non-finite leaf (and not `allow_nonfinite`); nothing written.
  """
  if not allow_nonfinite and not bool(_all_finite_on_device(state)):
    raise CheckpointError(
      f"refusing to write checkpoint {step} in {mngr.directory}: the train state holds "
      "non-finite values (NaN/inf)"
    )
  finite = val_loss is not None and math.isfinite(float(val_loss))
  metrics = {VAL_LOSS: float(val_loss)} if finite else None
  try:
    # Orbax waits for the previous save inside `save` anyway; waiting here first reports a
    # failure of that previous save as itself (its step), not as this one.
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(mngr, None, e, trained=step) from e
  try:
    mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
      ),
      metrics=metrics,
    )
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(mngr, step, e) from e


def check_saved(mngr: ocp.CheckpointManager, step: int) -> None:
  """Raises CheckpointError when an async save has failed (cheap: polls the save thread).

  Called after every train step, so a failed save (a full disk) stops the run within a step
  of the failure being known; `step` is the step being trained (for the message only).
  """
  try:
    mngr.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(mngr, None, e, trained=step) from e


def wait_until_saved(mngr: ocp.CheckpointManager) -> None:
  """Waits for the pending async save; CheckpointError (one line) if it failed."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(mngr, None, e) from e


def _save_error(
  mngr: ocp.CheckpointManager, step: int | None, e: BaseException, trained: int | None = None
) -> CheckpointError:
  directory = str(mngr.directory)
  committed = committed_steps(directory)
  if step is None:  # an async save: the newest step directory being written
    step = max(_pending_steps(directory, committed), default=None)
  good = sorted(s for s in committed if s != step)
  where = paths.join(directory, str(step)) if step is not None else directory
  return CheckpointError(
    f"saving checkpoint {step if step is not None else '?'} to {where} failed: {_cause(e)}; "
    f"training stopped{f' at step {trained}' if trained is not None else ''}; the last good "
    f"checkpoint is {f'step {good[-1]}' if good else 'none'} (rerun the command to resume "
    "once the cause, e.g. a full disk, is fixed)"
  )


def has_checkpoints(workdir: str | pathlib.Path) -> bool:
  """Whether `<workdir>/checkpoints` holds a committed step directory (good or damaged)."""
  return bool(committed_steps(paths.join(workdir, "checkpoints")))


def latest_intact_step(workdir: str | pathlib.Path) -> int | None:
  """The newest finalised step under `<workdir>/checkpoints` if it looks intact, else None.

  A cheap look (no Orbax manager, no restore) for "is this run already complete?": a newest
  step that is visibly damaged gives None, so the run goes through `restore_newest_good`
  (fall back, or one error line) instead of declaring itself done. Safe beside a live run
  of the workdir (it writes new steps and moves damaged ones away while this looks).
  """
  steps = committed_steps(paths.join(workdir, "checkpoints"))
  if not steps:
    return None
  newest = max(steps)
  try:
    problem = structure_problem(paths.path(paths.join(workdir, "checkpoints", str(newest))))
  except FileNotFoundError:  # moved away, as damaged, by a live run while this looked
    return None
  return newest if problem is None else None


def best_step(workdir: str | pathlib.Path) -> int | None:
  """The kept step with the lowest validation loss under `<workdir>/checkpoints` (the one the
  preservation policy keeps besides the latest), or None when no kept step carries one.

  It is the best of the *checkpointed* evaluations only: a run whose `checkpoint_every` equals
  `eval_every` checkpoints every evaluation, so this is then its best evaluation.
  """
  if not committed_steps(paths.join(workdir, "checkpoints")):
    return None
  mngr = manager(workdir, read_only=True)
  try:
    step = mngr.best_step()
    metrics = mngr.metrics(step) if step is not None else None
  finally:
    mngr.close()
  if not metrics or not math.isfinite(_val_loss(dict(metrics))):
    return None  # no kept step has a finite validation loss (best_step then falls to latest)
  return int(step)


def resolve_step(workdir: str | pathlib.Path, value: str | None) -> int | None:
  """A reader's `--step` value: None (the newest intact step, the reader's default), a step
  number, or 'best' (the kept step with the lowest validation loss, `best_step`).

  Raises:
    CheckpointError: `value` is neither, or 'best' and no kept step carries a validation loss.
  """
  if value is None or value == "":
    return None
  if value.isdigit():
    return int(value)
  if value != "best":
    raise CheckpointError(f"--step={value!r}: expected a step number or 'best'")
  step = best_step(workdir)
  if step is None:
    raise CheckpointError(
      f"{paths.join(workdir, 'checkpoints')}: --step=best: no kept checkpoint carries a "
      "validation loss (checkpoint_every must be a multiple of eval_every)"
    )
  return step


def committed_steps(directory: str | pathlib.Path) -> list[int]:
  """The steps under the checkpoint directory `directory` that Orbax committed, as its own
  listing has them: locally a step directory renamed from its temporary name, on GCS one that
  holds its `commit_success.txt` (a step killed mid-write there has its final name already)."""
  return sorted(ocp.step.checkpoint_steps(paths.path(directory)))


def _pending_steps(directory: str, committed: list[int]) -> list[int]:
  """Steps being written (or left by a killed write): locally `<step>.orbax-checkpoint-tmp*`
  directories, on GCS step directories without their commit marker."""
  if not paths.isdir(directory):
    return []
  names = [n.split(".")[0] for n in paths.listdir(directory)]
  return [int(n) for n in names if n.isdigit() and int(n) not in committed]


def _cause(e: BaseException) -> str:
  """One short line: the innermost exception of the chain (TensorStore/OS say what broke)."""
  chain = [e]
  while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
    chain.append(nxt)
  for err in chain:  # a full disk, the usual cause, says so far down a long message
    if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in str(err):
      return "no space left on device (ENOSPC)"
  for err in reversed(chain):
    text = str(err).strip()
    if text and "See full TensorStore details" not in text:
      # TensorStore names the database path, which the caller's message already holds.
      first = re.sub(r' in OCDBT database at local file "[^"]*"', "", text.splitlines()[0])
      return f"{type(err).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"
  return type(e).__name__


def all_finite(tree: Any) -> jax.Array:
  """True iff every floating-point leaf of `tree` is finite (integer leaves always are).

  What "finite" means for a train state: `save` writes no state that fails it, and the jitted
  update step (`medvl_jax.train.step`) applies no update that fails it.
  """
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


_all_finite_on_device = jax.jit(all_finite)  # `save`'s check: one device reduction


def restore(
  mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> tuple[Any, dict]:
  """Restores (state, data_state) at `step` (default: latest) onto `abstract_state`'s shardings."""
  steps = mngr.all_steps()
  step = mngr.latest_step() if step is None else step
  if step is None or step not in steps:
    raise CheckpointError(
      f"no checkpoint for step {step} in {mngr.directory} (available: {list(steps) or 'none'})"
    )
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
  )
  out = mngr.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
  )
  return out["state"], out["data"]


def structure_problem(step_dir: epath.Path) -> str | None:
  """What is visibly wrong with a committed step directory (None: looks complete)."""
  if not step_dir.is_dir() or not any(step_dir.iterdir()):
    return "the step directory is empty"
  for item in ITEMS:
    if not (step_dir / item).is_dir() or not any((step_dir / item).iterdir()):
      return f"item {item!r} is missing"
  try:
    json.loads((step_dir / "state" / "_METADATA").read_text())
  except (OSError, ValueError) as e:
    return f"state/_METADATA is unreadable ({type(e).__name__})"
  return None


def step_damage(step_dir: pathlib.Path, keys: tuple[str, ...] | None = None) -> str | None:
  """What makes a committed step unusable (None: it is intact): its structure
  (`structure_problem`), else the error of reading the arrays of its `state` item (those under
  the top-level `keys`; default all) as the step's own metadata describes them, so that a
  checkpoint that merely does not fit a model is not called damaged.

  For readers of a run (export, evaluate); training's `restore_newest_good` restores each step
  onto its own model instead, whose fit `config_check.check_resumable` has already proven.
  """
  cause = structure_problem(step_dir)
  if cause is not None:
    return cause
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(step_dir / "state").item_metadata
      tree = {k: meta[k] for k in meta.keys() if keys is None or k in keys}
      item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      ckptr.restore(
        step_dir / "state",
        args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True),
      )
  except Exception as e:  # pylint: disable=broad-except
    return _cause(e)
  return None


def restore_newest_good(
  mngr: ocp.CheckpointManager, abstract_state: Any, workdir: str | pathlib.Path
) -> tuple[int, Any, dict] | None:
  """(step, state, data_state) of the newest step that restores; None if there is none.

  A damaged step gets one WARNING naming the step and the cause and is moved to
  `<workdir>/checkpoints_damaged/` (kept for inspection; a later save of that step number
  would otherwise collide with it). Raises CheckpointError when checkpoints exist but none
  restores: the run never silently starts afresh over them.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  directory = paths.path(mngr.directory)
  damaged = []
  for step in steps:
    cause = structure_problem(directory / str(step))
    if cause is None:
      try:
        state, data_state = restore(mngr, abstract_state, step)
        if not isinstance(data_state, dict) or int(data_state.get("batches_consumed", -1)) != step:
          raise ValueError(f"item 'data' does not hold step {step}: {data_state!r:.80}")
      except Exception as e:  # pylint: disable=broad-except
        cause = _cause(e)
    if cause is None:
      if damaged:
        _move_damaged(directory, [s for s, _ in damaged], workdir)
        mngr.reload()
      return step, state, data_state
    logging.warning(
      "checkpoint step %d in %s is damaged (%s); falling back to the previous step",
      step,
      directory,
      cause,
    )
    damaged.append((step, cause))
  raise CheckpointError(
    f"no usable checkpoint in {directory}: "
    + "; ".join(f"step {s}: {c}" for s, c in damaged)
    + " (move the directory away, or pass --restart_from_scratch to start over)"
  )


def _move_damaged(directory: epath.Path, steps: list[int], workdir) -> None:
  if jax.process_index() != 0:
    return
  target = paths.join(workdir, DAMAGED_DIR)
  paths.mkdir(target)
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  for step in steps:
    dest = paths.join(target, f"{step}-{stamp}")
    paths.move(directory / str(step), dest)
    logging.warning("moved damaged checkpoint step %d to %s", step, dest)
