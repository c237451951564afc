"""torchvision ResNet state dicts <-> `medvl_jax.models.resnet.ResNet` variables."""

from collections.abc import Mapping
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.interop import mapping
from medvl_jax.models.resnet import ResNet50


def variable_shapes(model: nn.Module) -> dict[str, Any]:
  """Abstract {'params', 'batch_stats'} trees (shapes only) of a ResNet module."""
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}


def _is_ignored(name: str) -> bool:
  return name.startswith("fc.") or name.endswith("num_batches_tracked")


def from_torchvision_state_dict(
  state_dict: Mapping[str, np.ndarray], source: str, model: nn.Module | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """torchvision state dict -> (params, batch_stats) of `model` (default ResNet50())."""
  kept = {k: v for k, v in state_dict.items() if not _is_ignored(k)}
  shapes = variable_shapes(model if model is not None else ResNet50())
  trees = mapping.from_torch(kept, shapes, source)
  return trees["params"], trees["batch_stats"]


def to_torchvision_state_dict(
  params: Mapping[str, Any], batch_stats: Mapping[str, Any]
) -> dict[str, np.ndarray]:
  """(params, batch_stats) -> torchvision state dict without `fc.*`/`num_batches_tracked`."""
  return mapping.to_torch(params, batch_stats)


def load_resnet50(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a torchvision resnet50 state dict (`.pth`/`.pt` or `.safetensors`).

  Returns:
    (params, batch_stats) of `ResNet50()` as float32 NumPy arrays.

  Raises:
    WeightsError: one line naming the file and what is wrong.
  """
  state_dict = mapping.read_state_dict(path)
  return from_torchvision_state_dict(state_dict, str(path))


def to_torchvision_loadable_state_dict(
  params: Mapping[str, Any], batch_stats: Mapping[str, Any]
) -> dict[str, np.ndarray]:
  """Like `to_torchvision_state_dict`, plus `num_batches_tracked` (int64 zeros) per BatchNorm.

  The result loads with `load_state_dict(strict=True)` into the torchvision model once its
  `fc` is `torch.nn.Identity()`. JAX does not count batches; torch reads the count only for
  BatchNorm with `momentum=None`.
  """
  out = to_torchvision_state_dict(params, batch_stats)
  for name in [n for n in out if n.endswith(".running_mean")]:
    out[name[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out
