"""Export a run to PyTorch / Hugging Face files, through its model family's interop half.

  meta = export(workdir, out, step=None, overwrite=False, allow_nonfinite=False)

`python -m medvl_jax.export` is the command line over this. A checkpoint whose params or batch
statistics hold NaN/inf is refused unless `allow_nonfinite`.

The run's family (`registry.get(config.model.name).export`) writes its files, e.g. ConVIRT:
  OUT/image_encoder/model.safetensors    torchvision ResNet state dict without `fc.*`
  OUT/image_encoder/preprocessing.json   what to do to pixels to match the JAX image encoder
  OUT/text_encoder/                      Hugging Face BERT directory (config, weights, tokenizer)
  OUT/projection_heads.safetensors       `image.fc1.weight` [out, in], ... (torch Linear layout)
and the mixed model a timm ViT (`image_encoder/timm.json` names it) instead of the ResNet.
This module adds OUT/export.json: step, source workdir, model, what the family records (files,
preprocessing, pooling, the embedding math, versions), the git commit of the exporting code
(`code_commit`, 'unknown' outside a git checkout) and the training config; and OUT/README.md,
a model card in the Hugging Face form (`model_card`).

WORKDIR and OUT are local paths or gs:// URLs (`medvl_jax.paths`). The export is assembled in
a local directory (`paths.output_dir`): for a local OUT a sibling `OUT.tmp-*` renamed to OUT
when complete, so OUT is either the previous content or the complete export, never a partial
one. A bucket has no directory rename: every file is uploaded, export.json last, so a reader
treats an OUT without export.json as incomplete (an export being written, or one that
failed).
"""

import os
import pathlib
from typing import Any

from absl import logging
import jax
import numpy as np

from medvl_jax import families, paths
from medvl_jax.ckpt import run_dir
from medvl_jax.errors import CheckpointError, MedvlError, WeightsError
from medvl_jax.interop import export_files, model_card, registry


# ----------------------------------------------------------------------------- checks
def _nonfinite_arrays(tree: Any) -> list[str]:
  """Paths of the floating-point arrays of `tree` (host NumPy) holding a NaN or an inf."""
  return [
    jax.tree_util.keystr(path)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.all(np.isfinite(x))
  ]


# ----------------------------------------------------------------------------- writing
MANIFEST = "export.json"  # written last: an OUT without it is incomplete


def _check_out(out: str, overwrite: bool) -> None:
  if not paths.isdir(out):
    if paths.exists(out):
      raise WeightsError(f"{out}: exists and is not a directory")
    return
  if paths.listdir(out):
    if not overwrite:
      raise WeightsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    if not paths.isfile(paths.join(out, MANIFEST)):
      raise WeightsError(f"{out}: not an export directory (no export.json); refusing to replace it")


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
  workdir, out = paths.absolute(workdir), paths.absolute(out)
  paths.check_reachable(workdir)  # a bad URL: one line within seconds, not minutes of retries
  paths.check_reachable(out)
  if not paths.isdir(workdir):
    raise CheckpointError(f"{workdir}: workdir not found")
  config = run_dir.load_run_config(workdir)
  family, family_io = families.get(config.model.name), registry.get(config.model.name)
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

  commit = model_card.code_commit()
  try:
    with paths.output_dir(out, MANIFEST, lambda old: _check_out(old, overwrite)) as local:
      tmp = pathlib.Path(local)
      recorded = family_io.export(model, params, batch_stats, config, tmp)
      meta = {
        "step": int(step),
        "source_workdir": workdir,
        "model": config.model.name,
        **recorded,
        "code_commit": commit,
        "config": config.to_dict(),
      }
      export_files.write_json(tmp / MANIFEST, meta)
      card = family_io.card(model, config, recorded)
      model_card.write(tmp, model_card.render(card, params, config, step, workdir, commit))
  except OSError as e:
    if isinstance(e, MedvlError):  # an unreachable bucket says so itself
      raise
    raise WeightsError(f"{out}: cannot write the export: {e}") from e
  return meta
