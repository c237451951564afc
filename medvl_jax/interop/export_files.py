"""Writing a family's export files: safetensors, JSON, the run's tokenizer, package versions.

Each family's `export` writes its files with these into the temporary directory that
`interop.export` renames into place when complete, so every family's files are written the
same way (float32 tensors tagged for PyTorch, a progress bar on large files, files that follow
the umask).
"""

import importlib.metadata
import json
import pathlib
import shutil
from typing import Any

import numpy as np
import safetensors.numpy

from medvl_jax import progress
from medvl_jax.data import tokenizer as tokenizer_lib
from medvl_jax.errors import WeightsError

_ST_METADATA = {"format": "pt"}  # transformers and safetensors.torch expect this tag.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "vocab.txt",
  "special_tokens_map.json",
  "added_tokens.json",
)


def save_safetensors(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
  """Writes `tensors` (floating ones as float32) to `path`, with a progress bar if large."""
  arrays = {}
  n_bytes = sum(np.asarray(v).nbytes for v in tensors.values())
  bar = progress.bar(
    n_bytes, f"export {path.name}", unit="B", min_total=progress.MIN_EXPORT_BYTES, unit_scale=True
  )
  for name, value in tensors.items():
    value = np.asarray(value)
    bar.update(value.nbytes)
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    arrays[name] = np.ascontiguousarray(value)
  bar.close()
  # Written through Python (not save_file) so that the file mode follows the umask.
  path.write_bytes(safetensors.numpy.save(arrays, metadata=_ST_METADATA))


def write_json(path: pathlib.Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2) + "\n")


def copy_tokenizer(text_cfg: Any, text_dir: pathlib.Path) -> None:
  """Copies the run's tokenizer files unchanged (the ones training loaded) into `text_dir`.

  The tokenizer directory is `text_cfg.tokenizer`, or `text_cfg.init` when that is ''.
  """
  tokenizer_dir = tokenizer_lib.directory(text_cfg)
  if not tokenizer_dir or not pathlib.Path(tokenizer_dir).is_dir():
    raise WeightsError(
      f"tokenizer directory of the run not found: {str(tokenizer_dir)!r} "
      "(config.model.text.tokenizer or .init)"
    )
  src = pathlib.Path(tokenizer_dir)
  copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
  if "tokenizer.json" not in copied and "vocab.txt" not in copied:
    raise WeightsError(f"{src}: no tokenizer.json or vocab.txt to export")
  for name in copied:
    shutil.copyfile(src / name, text_dir / name)


def versions(names: tuple[str, ...]) -> dict[str, str]:
  """{package: installed version} for the installed ones among `names`."""
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out
