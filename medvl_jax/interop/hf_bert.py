"""Hugging Face BERT checkpoints (local directory) <-> `medvl_jax.models.bert.BertModel`.

`read_config` (the directory's config.json) lives with the model in `models.bert`.
"""

from collections.abc import Mapping
import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.errors import WeightsError
from medvl_jax.interop import mapping
from medvl_jax.models.bert import BertConfig, BertModel, read_config

# Preferred first. Sharded checkpoints (*.index.json) are not supported.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_IGNORED_PREFIXES = ("pooler.", "cls.")
_IGNORED_SUFFIXES = ("position_ids", "token_type_ids")  # Registered buffers, not weights.


def param_shapes(config: BertConfig) -> Mapping[str, Any]:
  """Abstract `params` tree (shapes only) of `BertModel(config)`."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: BertModel(config).init(jax.random.key(0), ids, ids))["params"]


def normalise_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops pooler/`cls.*`/buffers, strips a `bert.` prefix, renames legacy gamma/beta."""
  out = {}
  for name, value in state_dict.items():
    if name.startswith("bert."):
      name = name[len("bert.") :]
    if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES):
      continue
    if name.endswith("LayerNorm.gamma"):
      name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
      name = name[: -len("beta")] + "bias"
    out[name] = value
  return out


def from_hf_state_dict(
  state_dict: Mapping[str, np.ndarray], config: BertConfig, source: str
) -> dict[str, Any]:
  """HF BertModel state dict (any prefix/extras) -> flax `params` of `BertModel(config)`."""
  trees = mapping.from_torch(normalise_keys(state_dict), {"params": param_shapes(config)}, source)
  return trees["params"]


def to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax `BertModel` params -> HF `BertModel` state dict (no prefix, no pooler)."""
  return mapping.to_torch(params)


def load_bert(path: str | os.PathLike, num_layers: int = 0) -> tuple[BertConfig, dict[str, Any]]:
  """Reads a local HF BERT directory (config.json + model.safetensors or pytorch_model.bin).

  `num_layers` > 0 keeps the checkpoint's first `num_layers` transformer layers (a shallower
  tower with the same embeddings and lower layers, `model.text.init_layers`); 0 keeps all.

  Returns:
    The config and the flax `params` tree of `BertModel(config)` as float32 NumPy arrays.

  Raises:
    WeightsError: one line naming the directory/file and what is wrong.
  """
  path = pathlib.Path(path)
  config = read_config(path)
  for name in WEIGHT_FILES:
    if (path / name).is_file():
      weights_file = path / name
      break
  else:
    raise WeightsError(f"{path}: no weights file (looked for {', '.join(WEIGHT_FILES)})")
  state_dict = mapping.read_state_dict(weights_file)
  if num_layers:
    if not 0 < num_layers <= config.num_layers:
      raise WeightsError(
        f"{path}: cannot keep {num_layers} layers of a {config.num_layers}-layer checkpoint"
      )
    config = dataclasses.replace(config, num_layers=num_layers)
    dropped = tuple(f"encoder.layer.{i}." for i in range(num_layers, read_config(path).num_layers))
    state_dict = {k: v for k, v in normalise_keys(state_dict).items() if not k.startswith(dropped)}
  return config, from_hf_state_dict(state_dict, config, str(weights_file))


def to_hf_state_dict_with_pooler(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """`to_hf_state_dict` plus a zero `pooler.*`, so `BertModel` loads with no missing keys.

  The flax model has no pooler (ConVIRT max-pools tokens); a zero pooler makes
  `pooler_output` all zeros rather than random, so using it by mistake is easy to spot.
  """
  out = to_hf_state_dict(params)
  hidden = out["embeddings.word_embeddings.weight"].shape[1]
  out["pooler.dense.weight"] = np.zeros((hidden, hidden), np.float32)
  out["pooler.dense.bias"] = np.zeros((hidden,), np.float32)
  return out
