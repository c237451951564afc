"""timm `VisionTransformer` state dicts <-> `medvl_jax.models.vit.ViT` params, both ways.

The flax names are timm's (`blocks/3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight`) through
the package's one mapping rule; only the two root parameters `cls_token` and `pos_embed` keep
their names and shapes ([1, 1, D] and [1, 1 + P, D] on both sides).
"""

from collections.abc import Mapping
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax import interop
from medvl_jax.errors import WeightsError
from medvl_jax.models.vit import ViT, ViTConfig

ROOT_PARAMS = ("cls_token", "pos_embed")
# timm classifier parts the encoder does not have; dropped on import.
_IGNORED_PREFIXES = ("head.", "fc_norm.", "head_drop.")
TIMM_MODEL = "vit_base_patch16_224"  # Any vit_*_patch16_* works with the kwargs below.


def timm_architecture(config: ViTConfig) -> tuple[str, dict[str, Any]]:
  """(name, kwargs) so `timm.create_model(name, **kwargs)` builds this ViT without a head."""
  return TIMM_MODEL, {
    "img_size": config.image_size,
    "patch_size": config.patch_size,
    "in_chans": config.in_chans,
    "embed_dim": config.hidden_size,
    "depth": config.num_layers,
    "num_heads": config.num_heads,
    "mlp_ratio": config.mlp_ratio,
    "num_classes": 0,
    "global_pool": "token",
  }


def param_shapes(config: ViTConfig) -> Mapping[str, Any]:
  """Abstract `params` tree (shapes only) of `ViT(config)`."""
  x = jnp.zeros((1, config.image_size, config.image_size, config.in_chans), jnp.float32)
  return jax.eval_shape(lambda: ViT(config).init(jax.random.key(0), x))["params"]


def to_timm_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """ViT params -> timm state dict (loads with `load_state_dict(strict=True)`, no head)."""
  rest = {k: v for k, v in params.items() if k not in ROOT_PARAMS}
  out = interop.to_torch(rest)
  for name in ROOT_PARAMS:
    out[name] = np.asarray(params[name], np.float32)
  return out


def from_timm_state_dict(
  state_dict: Mapping[str, np.ndarray], source: str, config: ViTConfig
) -> dict[str, Any]:
  """timm state dict -> ViT(config) params (float32 NumPy); WeightsError on any mismatch."""
  kept = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}
  shapes = dict(param_shapes(config))
  roots = {name: shapes.pop(name) for name in ROOT_PARAMS}
  missing = [n for n in ROOT_PARAMS if n not in kept]
  if missing:
    raise WeightsError(
      f"{source}: checkpoint does not match the model: missing keys {', '.join(missing)}"
    )
  body = {k: v for k, v in kept.items() if k not in ROOT_PARAMS}
  params = interop.from_torch(body, {"params": shapes}, source)["params"]
  for name, shape in roots.items():
    got = tuple(np.shape(kept[name]))
    if got != tuple(shape.shape):
      raise WeightsError(
        f"{source}: shape mismatch for {name}: checkpoint {got} vs model "
        f"{tuple(shape.shape)} (image_size/patch_size/hidden_size differ?)"
      )
    params[name] = np.asarray(kept[name], np.float32)
  return params


def load_vit(path: str | os.PathLike, config: ViTConfig) -> dict[str, Any]:
  """Reads a timm ViT state dict (`.safetensors` or a torch file) into ViT(config) params."""
  return from_timm_state_dict(interop.read_state_dict(path), str(path), config)
