"""Orbax checkpointing: async saves of the train state and the data-iterator position.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds two items:
  state  the TrainState (params, batch_stats, optimizer state, step), restored with the target
         shardings of the current mesh;
  data   JSON with the input position (global batches consumed) and the seed, so a resumed run
         reads exactly the batches an uninterrupted one would.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-write leaves no checkpoint that `latest_step()` would pick up. Kept: the latest
`keep_checkpoints` steps plus the best one by validation loss.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from medvl_jax.errors import CheckpointError

VAL_LOSS = "val_loss"


def manager(
  workdir: str | pathlib.Path, keep: int = 2, read_only: bool = False
) -> ocp.CheckpointManager:
  preservation = ocm.AnyPreservationPolicy(
    [
      ocm.LatestN(n=keep),
      # BestN sorts by the metric and keeps the tail: reverse=True keeps the lowest val_loss.
      ocm.BestN(
        get_metric_fn=lambda m: m[VAL_LOSS],
        reverse=True,
        n=1,
        keep_checkpoints_without_metrics=False,
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=preservation,
    best_fn=lambda m: m[VAL_LOSS],
    best_mode="min",
    enable_async_checkpointing=True,
    read_only=read_only,
    create=not read_only,
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
) -> None:
  metrics = None if val_loss is None else {VAL_LOSS: float(val_loss)}
  mngr.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
    metrics=metrics,
  )


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
