"""Initialisation of a model's towers from PyTorch-format checkpoints named in the config."""

from collections.abc import Mapping
import copy
from typing import Any

import jax.numpy as jnp
import numpy as np

from medvl_jax.errors import WeightsError
from medvl_jax.interop import hf_bert, torchvision_resnet
from medvl_jax.interop.mapping import flatten, names, unflatten


def _replace(
  variables: dict[str, Any], collection: str, key: str, new: Mapping[str, Any], source: str
) -> None:
  """Replaces variables[collection][key] by `new` after checking paths and shapes."""
  old = flatten(variables[collection][key])
  new_flat = flatten(new)
  missing = ["/".join(p) for p in old if p not in new_flat]
  extra = ["/".join(p) for p in new_flat if p not in old]
  if missing or extra:
    raise WeightsError(
      f"{source}: imported {collection}/{key} does not match the model: "
      f"missing {names(missing) or '-'}; unexpected {names(extra) or '-'}"
    )
  bad = [
    f"{collection}/{key}/{'/'.join(p)} imported {tuple(np.shape(v))} vs model {tuple(old[p].shape)}"
    for p, v in new_flat.items()
    if tuple(np.shape(v)) != tuple(old[p].shape)
  ]
  if bad:
    raise WeightsError(f"{source}: shape mismatch for {len(bad)} leaves: {names(bad)}")
  variables[collection][key] = unflatten(
    {p: jnp.asarray(v, dtype=old[p].dtype) for p, v in new_flat.items()}
  )


def init_from_pretrained(variables: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
  """Returns a copy of ConVIRT `variables` with the towers replaced by imported checkpoints.

  Args:
    variables: {'params': ..., 'batch_stats': ...} as returned by `ConVIRT.init`.
    model_cfg: the model config; `text.init` (HF BERT dir) and `image.init` (torchvision
      ResNet-50 state dict file) select what is imported; '' means keep the initialisation.

  Raises:
    WeightsError: a checkpoint is missing, unreadable or does not fit the model.
  """
  out = {c: copy.copy(dict(v)) for c, v in variables.items()}
  if model_cfg.text.init:
    _, params = hf_bert.load_bert(model_cfg.text.init)
    _replace(out, "params", "text", params, str(model_cfg.text.init))
  if model_cfg.image.init:
    params, stats = torchvision_resnet.load_resnet50(model_cfg.image.init)
    _replace(out, "params", "image", params, str(model_cfg.image.init))
    _replace(out, "batch_stats", "image", stats, str(model_cfg.image.init))
  return out
