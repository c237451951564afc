"""Orbax checkpointing: async saves of the train state and the data-iterator position.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds two items:
  state  the TrainState (params, batch_stats, optimizer state, step), restored with the target
         shardings of the current mesh;
  data   JSON with the input position (global batches consumed) and the seed, so a resumed run
         reads exactly the batches an uninterrupted one would.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-write leaves no checkpoint that `latest_step()` would pick up. Kept: the latest
`keep_checkpoints` steps plus the best one by validation loss.

Non-finite values: `save` refuses a state with a NaN/inf leaf (unless `allow_nonfinite`), and a
non-finite validation loss is not recorded as the step's metric, so the per-step metrics file
(`<step>/metrics/metrics`, JSON) never holds a bare `NaN` and such a step is never "best"; a
metric that is not finite anyway (written by an older version) ranks as +inf, i.e. worst.
"""

from collections.abc import Callable
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from medvl_jax.errors import CheckpointError

VAL_LOSS = "val_loss"


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
  """`on_commit`: called from Orbax's background thread when an async save is finalised (just
  before its temporary directory is renamed into place)."""
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
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
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

  Raises:
    CheckpointError: `state` has a non-finite leaf (and not `allow_nonfinite`); nothing written.
  """
  if not allow_nonfinite and not bool(_all_finite(state)):
    raise CheckpointError(
      f"refusing to write checkpoint {step} in {mngr.directory}: the train state holds "
      "non-finite values (NaN/inf)"
    )
  finite = val_loss is not None and math.isfinite(float(val_loss))
  metrics = {VAL_LOSS: float(val_loss)} if finite else None
  mngr.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
    metrics=metrics,
  )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  """One device reduction (as `step.all_finite`; step and checkpoint are independent layers)."""
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


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
