r"""Export a run to PyTorch / Hugging Face files, through its model family.

  python -m medvl_jax.export --workdir=runs/convirt --out=exported [--step=N] [--overwrite]

A checkpoint whose params or batch statistics hold NaN/inf is refused (one line, exit 2) unless
`--allow_nonfinite`.

The run's family (`families.get(config.model.name).export`) writes its files, e.g. ConVIRT:
  OUT/image_encoder/model.safetensors    torchvision ResNet state dict without `fc.*`
  OUT/image_encoder/preprocessing.json   what to do to pixels to match the JAX image encoder
  OUT/text_encoder/                      Hugging Face BERT directory (config, weights, tokenizer)
  OUT/projection_heads.safetensors       `image.fc1.weight` [out, in], ... (torch Linear layout)
and the mixed model a timm ViT (`image_encoder/timm.json` names it) instead of the ResNet.
This module adds OUT/export.json: step, source workdir, model, what the family records (files,
preprocessing, pooling, the embedding math, versions) and the training config.

OUT is written into a sibling `OUT.tmp-*` directory that is renamed to OUT when complete, so
OUT is either the previous content or the complete export, never a partial one.
"""

import os
import pathlib
import secrets
import shutil
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np

from medvl_jax import cli, families
from medvl_jax.ckpt import run_dir
from medvl_jax.errors import CheckpointError, MedvlError, WeightsError
from medvl_jax.interop import export_files


# ----------------------------------------------------------------------------- checks
def _nonfinite_arrays(tree: Any) -> list[str]:
  """Paths of the floating-point arrays of `tree` (host NumPy) holding a NaN or an inf."""
  return [
    jax.tree_util.keystr(path)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.all(np.isfinite(x))
  ]


# ----------------------------------------------------------------------------- writing
def _check_out(out: pathlib.Path, overwrite: bool) -> None:
  if not out.exists():
    return
  if not out.is_dir():
    raise WeightsError(f"{out}: exists and is not a directory")
  if any(out.iterdir()):
    if not overwrite:
      raise WeightsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    if not (out / "export.json").is_file():
      raise WeightsError(f"{out}: not an export directory (no export.json); refusing to replace it")


def _install(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
  """Renames the complete `tmp` to `out`; a previous export is removed only afterwards."""
  if not (out.exists() and any(out.iterdir())):
    os.replace(tmp, out)  # Also replaces an empty directory at `out`, atomically.
    return
  _check_out(out, overwrite)
  old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except OSError:
    os.rename(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)


def export(
  workdir: str | os.PathLike,
  out: str | os.PathLike,
  step: int | None = None,
  overwrite: bool = False,
  allow_nonfinite: bool = False,
) -> dict[str, Any]:
  """Exports checkpoint `step` (default: latest) of a run; returns export.json's dict.

  A checkpoint with non-finite params or batch statistics is refused unless `allow_nonfinite`.

  Raises:
    CheckpointError: the run cannot be read (workdir, config.json, checkpoint step).
    ConfigError: the run's model family is unknown.
    WeightsError (or another MedvlError): one line naming what else is missing or wrong
      (non-finite weights included).
  """
  workdir = pathlib.Path(workdir).absolute()
  out = pathlib.Path(out).absolute()
  if not workdir.is_dir():
    raise CheckpointError(f"{workdir}: workdir not found")
  config = run_dir.load_run_config(workdir)
  family = families.get(config.model.name)
  _check_out(out, overwrite)
  model = family.build(config.model)
  step, params, batch_stats = run_dir.restore_variables(workdir, config, model, step)
  bad = _nonfinite_arrays({"params": params, "batch_stats": batch_stats})
  if bad and not allow_nonfinite:
    raise WeightsError(
      f"checkpoint step {step} of {workdir} holds non-finite weights (NaN/inf in {len(bad)} "
      f"arrays, e.g. {bad[0]}); refusing to export them (--allow_nonfinite exports anyway)"
    )
  if bad:
    logging.warning("exporting non-finite weights (--allow_nonfinite): %d arrays", len(bad))

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
  tmp.mkdir()
  try:
    recorded = family.export(model, params, batch_stats, config, tmp)
    meta = {
      "step": int(step),
      "source_workdir": str(workdir),
      "model": config.model.name,
      **recorded,
      "config": config.to_dict(),
    }
    export_files.write_json(tmp / "export.json", meta)
    _install(tmp, out, overwrite)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
      raise WeightsError(f"{out}: cannot write the export: {e}") from e
    raise
  return meta


# ----------------------------------------------------------------------------- CLI
def _define_flags() -> None:
  """Defined only when run as a script, so importing this module defines no global flags."""
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json, checkpoints/).")
  flags.DEFINE_string(
    "out", None, "Output directory; must not exist or be empty unless --overwrite."
  )
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_bool("overwrite", False, "Replace a previous export in --out.")
  flags.DEFINE_bool(
    "allow_nonfinite", False, "Export even if the checkpoint's weights hold NaN/inf values."
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  fl = flags.FLAGS
  cli.set_up_process(logging.ERROR)  # Orbax's INFO/WARNING chatter on read-only restores.
  try:
    meta = export(fl.workdir, fl.out, fl.step, fl.overwrite, fl.allow_nonfinite)
  except MedvlError as e:
    logging.flush()
    cli.die(str(e))
  print(
    f"exported step {meta['step']} of {meta['source_workdir']} to {pathlib.Path(fl.out).absolute()}"
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
