"""ConVIRT: image tower (ResNet) and text tower (BERT, max-pooled) with projection heads."""

from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvl_jax.errors import ConfigError
from medvl_jax.models import bert
from medvl_jax.models.bert import BertConfig, BertModel
from medvl_jax.models.resnet import CONV_IMPLS, ResNet50, ResNetSmall, ResNetTiny

IMAGE_VARIANTS = {"resnet50": ResNet50, "resnet_small": ResNetSmall, "resnet_tiny": ResNetTiny}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ProjectionHead(nn.Module):
  """g(h) = W2 relu(W1 h)."""

  hidden: int
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(self.out, dtype=self.dtype, name="fc2")(x)


class ConVIRT(nn.Module):
  """Two towers with projection heads; preprocessing of raw pixels happens in the model.

  Attributes:
    image_encoder: maps normalised [N, H, W, 3] images (and `train`) to [N, D_v] features.
    text_encoder: maps (input_ids, attention_mask, train=...) to hidden states [N, L, D_u].
    projection_dim: output size d of both heads.
    projection_hidden: hidden size of both heads.
    image_mean, image_std: per-channel normalisation in 0..1 units.
    dtype: computation dtype of the heads.
  """

  image_encoder: nn.Module
  text_encoder: nn.Module
  projection_dim: int = 512
  projection_hidden: int = 512
  image_mean: Sequence[float] = (0.485, 0.456, 0.406)
  image_std: Sequence[float] = (0.229, 0.224, 0.225)
  dtype: Any = jnp.float32

  def setup(self):
    # Clones named after the contract's submodule names (`params['image']`, ...).
    self.image = self.image_encoder.clone(parent=self, name="image")
    self.text = self.text_encoder.clone(parent=self, name="text")
    self.image_proj = ProjectionHead(self.projection_hidden, self.projection_dim, self.dtype)
    self.text_proj = ProjectionHead(self.projection_hidden, self.projection_dim, self.dtype)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """uint8/float [N, H, W, 1|3] in 0..255 -> float32 normalised [N, H, W, 3]."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be [N, H, W, 1|3], got shape {images.shape}")
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
      x = jnp.tile(x, (1, 1, 1, 3))
    mean = jnp.asarray(self.image_mean, jnp.float32)
    std = jnp.asarray(self.image_std, jnp.float32)
    return (x - mean) / std

  def encode_image(self, images: jax.Array, train: bool) -> jax.Array:
    """Raw images (0..255) -> pooled image features h_v [N, D_v]."""
    return self.image(self.preprocess(images), train=train)

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
    """Token ids -> h_u [N, D_u]: max over the hidden states of non-padding tokens only."""
    hidden = self.text(input_ids, attention_mask, train=train)
    valid = (jnp.asarray(attention_mask) > 0)[..., None]
    very_negative = jnp.finfo(hidden.dtype).min
    pooled = jnp.max(jnp.where(valid, hidden, very_negative), axis=1)
    # A row without any token (all padding) pools to zeros rather than finfo.min.
    return jnp.where(jnp.any(valid, axis=1), pooled, jnp.zeros_like(pooled))

  def __call__(
    self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, train: bool
  ) -> dict[str, jax.Array]:
    """Returns unnormalised projections {'image_embed': [N, d], 'text_embed': [N, d]}."""
    h_v = self.encode_image(images, train)
    h_u = self.encode_text(input_ids, attention_mask, train)
    return {"image_embed": self.image_proj(h_v), "text_embed": self.text_proj(h_u)}


def text_config(text_cfg: Any) -> BertConfig:
  """BERT shape from `text.init`'s config.json (its first `text.init_layers` layers when that
  is > 0), or from the config's shape fields."""
  if text_cfg.init:
    config = bert.read_config(text_cfg.init)
    keep = text_cfg.init_layers
    if keep:
      if not 0 < keep <= config.num_layers:
        raise ConfigError(
          f"config.model.text.init_layers={keep}: expected 0 (all) or 1..{config.num_layers}, "
          f"the layers of {text_cfg.init}"
        )
      config = dataclasses.replace(config, num_layers=keep)
  elif text_cfg.init_layers:
    raise ConfigError(
      f"config.model.text.init_layers={text_cfg.init_layers}: keeps layers of a checkpoint; "
      "set config.model.text.init (or init_layers=0)"
    )
  else:
    config = BertConfig(
      vocab_size=text_cfg.vocab_size,
      hidden_size=text_cfg.hidden_size,
      num_layers=text_cfg.num_layers,
      num_heads=text_cfg.num_heads,
      intermediate_size=text_cfg.intermediate_size,
      max_position_embeddings=text_cfg.max_position_embeddings,
    )
  return dataclasses.replace(
    config, hidden_dropout=text_cfg.hidden_dropout, attention_dropout=text_cfg.attention_dropout
  )


def from_config(model_cfg: Any) -> ConVIRT:
  """Builds ConVIRT from the `model` section of the config (an ml_collections.ConfigDict)."""
  if model_cfg.dtype not in DTYPES:
    raise ConfigError(
      f"model.dtype: unknown {model_cfg.dtype!r}; valid: {', '.join(sorted(DTYPES))}"
    )
  dtype = DTYPES[model_cfg.dtype]
  variant = model_cfg.image.variant
  if variant not in IMAGE_VARIANTS:
    raise ConfigError(
      f"model.image.variant: unknown {variant!r}; valid: {', '.join(sorted(IMAGE_VARIANTS))}"
    )
  conv_impl = model_cfg.image.conv_impl
  if conv_impl not in CONV_IMPLS:
    raise ConfigError(
      f"model.image.conv_impl: unknown {conv_impl!r}; valid: {', '.join(CONV_IMPLS)}"
    )
  if len(model_cfg.image.mean) != 3 or len(model_cfg.image.std) != 3:
    raise ConfigError("model.image.mean and model.image.std must have 3 values each")
  return ConVIRT(
    image_encoder=IMAGE_VARIANTS[variant](dtype=dtype, conv_impl=conv_impl),
    text_encoder=BertModel(text_config(model_cfg.text), dtype=dtype),
    projection_dim=model_cfg.projection_dim,
    projection_hidden=model_cfg.projection_hidden,
    image_mean=tuple(model_cfg.image.mean),
    image_std=tuple(model_cfg.image.std),
    dtype=dtype,
  )
