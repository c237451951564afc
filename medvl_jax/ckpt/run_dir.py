"""Reading a training run: its config, the abstract variables of its model, and the params
and batch statistics of a checkpoint step (without the optimizer state).

The one owner of this: `export.py`, `evaluate` and the resume check
(`config_check.check_resumable`) call it; `train/loop.py` writes what it reads
(`<workdir>/config.json` and `<workdir>/checkpoints/<step>/state`, see `checkpoint.py`). A
workdir is a local path or a gs:// URL: every access goes through `medvl_jax.paths`.
"""

import functools
import json
import pathlib
import time
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from medvl_jax import cli, families, paths
from medvl_jax.ckpt import checkpoint
from medvl_jax.errors import CheckpointError

# Keys that a config.json written by another version of the code may lack, with the value that
# version ran with (it read them with that default): `load_run_config` fills them in, so that
# the code reads every key directly. A key is filled where its section exists and, for a key of
# one kind of section, where that section has the named sibling (a ResNet image tower has a
# `variant`; a ViT tower has no `conv_impl`).
_FILLED_IN = (
  # (key, value, only in a section with this key)
  ("accumulate_steps", 1, None),
  ("evaluators", [], None),
  ("mesh", [["data", -1], ["fsdp", 1], ["model", 1]], None),
  ("sharding.fsdp_min_size", 2**14, None),
  ("data.sources", [], None),
  ("data.allow_repeats", False, None),
  ("loss.impl", "gather", None),
  ("model.image.conv_impl", "auto", "variant"),
)


def _fill_in(tree: dict[str, Any]) -> dict[str, Any]:
  """config.json's dict, with each key of `_FILLED_IN` that it lacks set where it applies."""
  for key, value, sibling in _FILLED_IN:
    *sections, last = key.split(".")
    section = tree
    for part in sections:
      section = section.get(part) if isinstance(section, dict) else None
    applies = isinstance(section, dict) and (sibling is None or sibling in section)
    if applies and last not in section:
      section[last] = value
  return tree


def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`, written by train/loop.py), with
  the keys that another version of the code did not write filled in (`_FILLED_IN`)."""
  path = paths.join(workdir, "config.json")
  if not paths.isfile(path):
    raise CheckpointError(f"{path}: not found (is {workdir} a training workdir?)")
  try:
    return ml_collections.ConfigDict(_fill_in(json.loads(paths.read_text(path))))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot parse: {e}") from e


def config_json(config: ml_collections.ConfigDict) -> str:
  """config.json's text: the config as JSON (tuples as lists, non-JSON values as strings)."""
  return json.dumps(config.to_dict(), indent=2, default=str) + "\n"


def write_run_config(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Atomically writes `<workdir>/config.json` (`paths.write_text`: locally a temporary file,
  fsynced and renamed; on GCS one object upload)."""
  path = paths.join(workdir, "config.json")
  try:
    paths.write_text(path, config_json(config))
  except OSError as e:
    raise CheckpointError(f"{path}: cannot write the run's config: {e}") from e


def restart_from_scratch(workdir: str | pathlib.Path) -> str | None:
  """Sets a run's checkpoints and TensorBoard logs aside (`<workdir>/discarded-<utc time>/`),
  so training starts afresh; nothing is deleted. Returns that directory (None: nothing to do).

  Locally each is renamed; on GCS copied, then removed (`paths.move`).
  """
  present = [n for n in ("checkpoints", "tensorboard", checkpoint.DAMAGED_DIR)]
  present = [n for n in present if paths.exists(paths.join(workdir, n))]
  if not present:
    return None
  target = paths.join(workdir, f"discarded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
  if paths.exists(target):
    raise FileExistsError(f"{target}: exists")
  paths.mkdir(target)
  for name in present:
    paths.move(paths.join(workdir, name), paths.join(target, name))
  return target


def abstract_variables(model: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Shapes of the run's variables ({'params', 'batch_stats'}), as training initialises them."""
  init = functools.partial(families.init_variables, model, config)
  return jax.eval_shape(init, jax.random.key(0))


def restore_variables(
  workdir: str | pathlib.Path,
  config: ml_collections.ConfigDict,
  model: Any,
  step: int | None = None,
) -> tuple[int, dict[str, Any], dict[str, Any]]:
  """Restores (step, params, batch_stats) as host NumPy arrays; the optimizer state is skipped.

  Without `step`, the newest intact step: each newer damaged one (as `checkpoint.step_damage`
  judges it, the kinds that training falls back from) gets one `warning:` line naming it and
  its cause. Nothing is moved or deleted: this only reads the run.

  Raises:
    CheckpointError: no checkpoints, `step` not among them (lists the available ones), `step`
      damaged (names the cause and lists the intact steps), no intact step at all, or a
      checkpoint that does not fit the model built from the run's config.
  """
  ckpt_dir = paths.join(workdir, "checkpoints")
  config_file = paths.join(workdir, "config.json")
  if not paths.isdir(ckpt_dir):
    raise CheckpointError(f"{ckpt_dir}: no checkpoints (train first, or check --workdir)")
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      raise CheckpointError(f"{ckpt_dir}: no complete checkpoints")
    if step is not None and step not in steps:
      raise CheckpointError(
        f"no checkpoint for step {step} in {ckpt_dir} (available: {', '.join(map(str, steps))})"
      )
    step_dirs = {
      s: ocp.step.find_step_path(mngr.directory, ocp.step.standard_name_format(), step=s)
      for s in steps
    }
  finally:
    mngr.close()
  # The `state` item alone, without the optimizer state, straight to host NumPy arrays.
  abstract = abstract_variables(model, config)
  item = {
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "params": abstract["params"],
    "batch_stats": abstract.get("batch_stats", {}),
  }
  damaged = []
  for candidate in [step] if step is not None else reversed(steps):
    state, cause = _restore_state(step_dirs[candidate], item, config_file)
    if state is not None:
      for bad, why in damaged:
        cli.warn(
          f"checkpoint step {bad} in {ckpt_dir} is damaged ({why}); using step {candidate}, "
          "the newest intact one"
        )
      _check_shapes(state, item, paths.join(ckpt_dir, str(candidate)), config_file)
      return candidate, state["params"], state["batch_stats"]
    if step is not None:
      intact = [s for s in steps if s != step and _intact(step_dirs[s])]
      raise CheckpointError(
        f"checkpoint step {step} in {ckpt_dir} is damaged ({cause}); intact steps: "
        + (", ".join(map(str, intact)) + " (choose one with --step)" if intact else "none")
      )
    damaged.append((candidate, cause))
  raise CheckpointError(
    f"no intact checkpoint in {ckpt_dir}: " + "; ".join(f"step {s}: {c}" for s, c in damaged)
  )


_VARIABLES = ("step", "params", "batch_stats")  # what of a step's `state` a reader restores


def _intact(step_dir: epath.Path) -> bool:
  return checkpoint.step_damage(step_dir, _VARIABLES) is None


def _restore_state(
  step_dir: epath.Path, item: dict[str, Any], config_file: str
) -> tuple[dict[str, Any] | None, str | None]:
  """(the restored `item`, None), or (None, the cause) when the step is damaged.

  Raises:
    CheckpointError: the step is intact but does not restore onto `item` (another model).
  """
  cause = checkpoint.structure_problem(step_dir)
  if cause is not None:
    return None, cause
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      state = ckptr.restore(
        step_dir / "state",
        args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True),
      )
  except Exception as e:  # pylint: disable=broad-except
    # Damaged, or intact but of another model: reading the step as its own metadata describes
    # it tells which.
    cause = checkpoint.step_damage(step_dir, _VARIABLES)
    if cause is not None:
      return None, cause
    first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise CheckpointError(
      f"{step_dir}: cannot restore it for the model of "
      f"{config_file}: {type(e).__name__}: {first_line}"
    ) from e
  return state, None


def _check_shapes(restored: Any, wanted: Any, source: str, config_file: str) -> None:
  """Orbax restores the stored shapes whatever the target, and gives an array the checkpoint
  lacks back as the target's placeholder (a partial restore): compare with the model's."""

  def shapes(tree, arrays_only=False):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
      jax.tree_util.keystr(path): tuple(np.shape(x))
      if isinstance(x, np.ndarray) or not arrays_only
      else "missing"
      for path, x in flat
    }

  got = shapes(restored, arrays_only=True)
  bad = [
    f"{k} checkpoint {got.get(k, 'missing')} vs model {shape}"
    for k, shape in shapes(wanted).items()
    if got.get(k) != shape
  ]
  if bad:
    raise CheckpointError(
      f"{source}: does not fit the model of {config_file}: "
      f"{'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
    )
