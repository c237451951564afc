r"""Export a ConVIRT run to PyTorch / Hugging Face files.

  python -m medvl_jax.export --workdir=runs/convirt --out=exported [--step=N] [--overwrite]

Writes (see docs/pytorch.md for the PyTorch side):
  OUT/image_encoder/model.safetensors    torchvision ResNet state dict without `fc.*`: set
                                         `model.fc = torch.nn.Identity()`, then
                                         `load_state_dict(..., strict=True)`
  OUT/image_encoder/preprocessing.json   what to do to pixels to match `ConVIRT.encode_image`
  OUT/text_encoder/                      Hugging Face BERT directory (config, weights, tokenizer)
  OUT/projection_heads.safetensors       `image.fc1.weight` [out, in], ... (torch Linear layout)
  OUT/export.json                        config, step, source, versions, the embedding math

OUT is written into a sibling `OUT.tmp-*` directory that is renamed to OUT when complete, so
OUT is either the previous content or the complete export, never a partial one.
"""
import importlib.metadata
import json
import os
import pathlib
import secrets
import shutil
from typing import Any

from absl import app, flags, logging
import ml_collections
import numpy as np
import safetensors.numpy

from medvl_jax import cli, families, progress, run, weights
from medvl_jax.errors import CheckpointError, MedvlError, WeightsError
from medvl_jax.weights import hf_bert, torchvision_resnet

POOLING = ("max over non-padding tokens: h_u[j] = max over tokens t with attention_mask[t] == 1 "
           "of last_hidden_state[t, j]; a row without any token gives zeros")
EMBEDDING = {
    "image": "z_v = fc2(relu(fc1(h_v))), h_v = image_encoder(preprocess(pixels)) (pooled)",
    "text": "z_u = fc2(relu(fc1(h_u))), h_u = pooling(text_encoder(input_ids, attention_mask))",
    "similarity": "cosine: <z_v / |z_v|, z_u / |z_u|>; the training loss divides it by "
                  "loss.temperature",
    "heads": "projection_heads.safetensors: fc(x) = x @ weight.T + bias (torch.nn.Linear)",
}
_ST_METADATA = {"format": "pt"}  # transformers and safetensors.torch expect this tag.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json", "added_tokens.json")
_VERSIONS = ("medvl_jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "transformers",
             "safetensors", "numpy", "torch", "torchvision")


# ----------------------------------------------------------------------------- files
def heads_state_dict(params: Any) -> dict[str, np.ndarray]:
  """{'image.fc1.weight': [out, in], 'image.fc1.bias': [out], ..., 'text.fc2.bias'}."""
  return weights.to_torch({"image": params["image_proj"], "text": params["text_proj"]})


def image_preprocessing(config: ml_collections.ConfigDict, model: Any) -> dict[str, Any]:
  """What a PyTorch user does to pixels to feed the exported ResNet as `encode_image` does."""
  enc = model.image_encoder
  stages, width = tuple(enc.stage_sizes), int(enc.width)
  resnet50 = stages == (3, 4, 6, 3) and width == 64
  return {
      "architecture": "torchvision.models.resnet50" if resnet50 else
                      f"ResNet v1.5 bottleneck, stage_sizes={list(stages)}, width={width}",
      "fc": "not exported: set model.fc = torch.nn.Identity() before load_state_dict",
      "feature_dim": 4 * width * 2 ** (len(stages) - 1),
      "input": "8-bit grayscale image (PIL mode 'L'), values 0..255",
      "resize": int(config.data.resize),
      "crop_size": int(config.data.image_size),
      "resize_crop": "eval transform: shorter side to `resize` (bilinear, antialiased), then "
                     "the central crop_size x crop_size window",
      "scale": "x / 255 in float32",
      "grayscale_to_rgb": "repeat the one channel 3 times",
      "mean": [float(m) for m in model.image_mean],
      "std": [float(s) for s in model.image_std],
      "normalise": "(x - mean) / std per channel",
      "layout": "torch NCHW [N, 3, crop_size, crop_size] (JAX: NHWC)",
  }


def _versions() -> dict[str, str]:
  out = {}
  for name in _VERSIONS:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def _save(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
  arrays = {}
  n_bytes = sum(np.asarray(v).nbytes for v in tensors.values())
  bar = progress.bar(n_bytes, f"export {path.name}", unit="B",
                     min_total=progress.MIN_EXPORT_BYTES, unit_scale=True)
  for name, value in tensors.items():
    value = np.asarray(value)
    bar.update(value.nbytes)
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    arrays[name] = np.ascontiguousarray(value)
  bar.close()
  # Written through Python (not save_file) so that the file mode follows the umask.
  path.write_bytes(safetensors.numpy.save(arrays, metadata=_ST_METADATA))


def _write_json(path: pathlib.Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- writing
def _copy_tokenizer(tokenizer_dir: str, text_dir: pathlib.Path) -> None:
  """Copies the run's tokenizer files unchanged (the ones training loaded)."""
  src = pathlib.Path(tokenizer_dir)
  copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
  if "tokenizer.json" not in copied and "vocab.txt" not in copied:
    raise WeightsError(f"{src}: no tokenizer.json or vocab.txt to export")
  for name in copied:
    shutil.copyfile(src / name, text_dir / name)


def _check_out(out: pathlib.Path, overwrite: bool) -> None:
  if not out.exists():
    return
  if not out.is_dir():
    raise WeightsError(f"{out}: exists and is not a directory")
  if any(out.iterdir()):
    if not overwrite:
      raise WeightsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    if not (out / "export.json").is_file():
      raise WeightsError(f"{out}: not an export directory (no export.json); refusing to "
                         "replace it")


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


def export(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
           overwrite: bool = False) -> dict[str, Any]:
  """Exports checkpoint `step` (default: latest) of a ConVIRT run; returns export.json's dict.

  Raises:
    CheckpointError: the run cannot be read (workdir, config.json, checkpoint step).
    WeightsError (or another MedvlError): one line naming what else is missing or wrong.
  """
  workdir = pathlib.Path(workdir).absolute()
  out = pathlib.Path(out).absolute()
  if not workdir.is_dir():
    raise CheckpointError(f"{workdir}: workdir not found")
  config = run.load_run_config(workdir)
  if config.model.name != "convirt":
    raise WeightsError(f"{workdir}: model.name={config.model.name!r}; export supports "
                       "'convirt' only")
  _check_out(out, overwrite)
  tokenizer_dir = config.model.text.tokenizer or config.model.text.init
  if not tokenizer_dir or not pathlib.Path(tokenizer_dir).is_dir():
    raise WeightsError(f"tokenizer directory of the run not found: {str(tokenizer_dir)!r} "
                       "(config.model.text.tokenizer or .init)")
  model = families.get(config.model.name).build(config.model)
  step, params, batch_stats = run.restore_variables(workdir, config, model, step)
  bert = model.text_encoder.config
  preprocessing = image_preprocessing(config, model)
  meta = {
      "step": int(step),
      "source_workdir": str(workdir),
      "model": "convirt",
      "files": {"image_encoder": "image_encoder/model.safetensors",
                "text_encoder": "text_encoder/", "heads": "projection_heads.safetensors"},
      "image_preprocessing": preprocessing,
      "text_preprocessing": {
          "tokenizer": "text_encoder/ (AutoTokenizer)",
          "max_length": int(config.data.max_length), "truncation": True,
          "token_type_ids": "zeros",
          "padding": "any: padding tokens are masked out of attention and pooling"},
      "pooling": POOLING,
      "text_pooler": "pooler.* written as zeros so that AutoModel loads without warnings; "
                     "ConVIRT does not use it (pooler_output is meaningless)",
      "embedding": EMBEDDING,
      "temperature": float(config.loss.temperature),
      "versions": _versions(),
      "config": config.to_dict(),
  }

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
  tmp.mkdir()
  try:
    (tmp / "image_encoder").mkdir()
    _save(torchvision_resnet.to_torchvision_loadable_state_dict(params["image"],
                                                                batch_stats["image"]),
          tmp / "image_encoder" / "model.safetensors")
    _write_json(tmp / "image_encoder" / "preprocessing.json", preprocessing)
    text_dir = tmp / "text_encoder"
    text_dir.mkdir()
    _copy_tokenizer(tokenizer_dir, text_dir)
    _write_json(text_dir / "config.json", bert.to_hf())
    _save(hf_bert.to_hf_state_dict_with_pooler(params["text"]), text_dir / "model.safetensors")
    _save(heads_state_dict(params), tmp / "projection_heads.safetensors")
    _write_json(tmp / "export.json", meta)
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
  flags.DEFINE_string("out", None, "Output directory; must not exist or be empty unless "
                      "--overwrite.")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_bool("overwrite", False, "Replace a previous export in --out.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  fl = flags.FLAGS
  if not fl["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Orbax's INFO/WARNING chatter on read-only restores.
  try:
    meta = export(fl.workdir, fl.out, fl.step, fl.overwrite)
  except MedvlError as e:
    logging.flush()
    cli.die(str(e))
  print(f"exported step {meta['step']} of {meta['source_workdir']} to "
        f"{pathlib.Path(fl.out).absolute()}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
