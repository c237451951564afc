"""The run's text tokenizer: a local Hugging Face fast tokenizer, and tokenising batches.

The tokenizer directory of a run is `config.model.text.tokenizer`, or `config.model.text.init`
(the BERT checkpoint's own directory) when that is ''; training, the evaluators and export all
find it through `directory`. Nothing is ever downloaded. Imports no TensorFlow.
"""

import os
import pathlib
from typing import Any

import numpy as np

from medvl_jax.errors import DataError


def directory(text_cfg: Any) -> str:
  """The tokenizer directory of `config.model.text`: `.tokenizer`, else `.init` ('' if both are
  empty)."""
  return text_cfg.tokenizer or text_cfg.init


def load(path: str | os.PathLike[str]) -> Any:
  """A local Hugging Face fast tokenizer (never downloads); DataError naming the path."""
  import transformers  # pylint: disable=g-import-not-at-top

  if not path or not pathlib.Path(path).is_dir():
    raise DataError(f"tokenizer directory not found: {str(path)!r}")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot load a tokenizer ({e})") from e
  if not tokenizer.is_fast:
    raise DataError(f"{path}: not a fast tokenizer (tokenizer.json missing?)")
  return tokenizer


def from_config(config: Any) -> Any:
  """`load` of the run's tokenizer directory (`directory(config.model.text)`)."""
  return load(directory(config.model.text))


def tokenize(batch: dict[str, Any], tokenizer, max_length: int) -> dict[str, Any]:
  """Replaces the batch's 'text' (bytes) by 'input_ids' and 'attention_mask' (int32 [B, L]),
  padded and truncated to `max_length`; rows whose 'has_text' is False get an all-padding text
  (pad ids, attention_mask all 0). Updates `batch` in place and returns it."""
  texts = [t.decode("utf-8") for t in batch.pop("text")]
  tokens = tokenizer(
    texts,
    padding="max_length",
    truncation=True,
    max_length=max_length,
    return_attention_mask=True,
    return_tensors="np",
  )
  ids = tokens["input_ids"].astype(np.int32)
  mask = tokens["attention_mask"].astype(np.int32)
  none = ~batch["has_text"]
  ids[none], mask[none] = tokenizer.pad_token_id, 0
  batch["input_ids"], batch["attention_mask"] = ids, mask
  return batch
