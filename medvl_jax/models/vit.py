"""Vision Transformer numerically equal to timm's `VisionTransformer` (class token, pre-norm).

Submodule and parameter names follow timm's `vit_*_patch16_*` state dict one-to-one
(`patch_embed/proj`, `cls_token`, `pos_embed`, `blocks/N/{norm1,attn/qkv,attn/proj,norm2,
mlp/fc1,mlp/fc2}`, `norm`), so `medvl_jax.interop.timm_vit` maps them both ways. Masked patches
(masked image modeling) are excluded as attention keys, which gives the visible tokens exactly
the outputs they would have if the masked patches were dropped (MAE) while keeping static
shapes.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvl_jax.errors import ConfigError

_INIT = nn.initializers.truncated_normal(stddev=0.02)  # timm's trunc_normal_(std=.02).
_NEG = -1e9  # Logit of an excluded key; finite so rows with no key give a uniform softmax.


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a ViT; defaults are ViT-B/16 at 224 (timm `vit_base_patch16_224`)."""

  image_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6  # timm ViT uses LayerNorm(eps=1e-6).
  dropout: float = 0.0
  attention_dropout: float = 0.0

  def __post_init__(self):
    if self.patch_size <= 0 or self.image_size % self.patch_size:
      raise ConfigError(
        f"model.image: patch_size {self.patch_size} does not divide image_size {self.image_size}"
      )
    if self.hidden_size % self.num_heads:
      raise ConfigError(
        f"model.image: hidden_size {self.hidden_size} is not divisible by "
        f"num_heads {self.num_heads}"
      )
    if self.in_chans not in (1, 3):
      raise ConfigError(f"model.image.in_chans must be 1 or 3, got {self.in_chans}")

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def mlp_dim(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)


class Attention(nn.Module):
  """timm `Attention`: fused qkv projection ([3, heads, head_dim] output order) and `proj`."""

  hidden_size: int
  num_heads: int
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None, train: bool) -> jax.Array:
    n, length, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    qkv = nn.Dense(3 * self.hidden_size, kernel_init=_INIT, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(n, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) * head_dim**-0.5
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.attention_dropout, deterministic=not train)(probs)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, length, self.hidden_size)
    return nn.Dense(self.hidden_size, kernel_init=_INIT, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  """timm `Mlp`: fc1 -> exact gelu -> fc2."""

  hidden_size: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Dense(self.mlp_dim, kernel_init=_INIT, dtype=self.dtype, name="fc1")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(x, approximate=False))
    x = nn.Dense(self.hidden_size, kernel_init=_INIT, dtype=self.dtype, name="fc2")(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

  hidden_size: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None, train: bool) -> jax.Array:
    def norm(name):
      return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)

    y = Attention(
      self.hidden_size, self.num_heads, self.attention_dropout, self.dtype, name="attn"
    )(norm("norm1")(x), key_mask, train)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    return x + Mlp(self.hidden_size, self.mlp_dim, self.dropout, self.dtype, name="mlp")(
      norm("norm2")(x), train
    )


class Blocks(nn.Module):
  """timm `blocks`: a sequence named '0', '1', ..."""

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None, train: bool) -> jax.Array:
    cfg = self.config
    for i in range(cfg.num_layers):
      x = Block(
        cfg.hidden_size,
        cfg.num_heads,
        cfg.mlp_dim,
        cfg.layer_norm_eps,
        cfg.dropout,
        cfg.attention_dropout,
        self.dtype,
        name=str(i),
      )(x, key_mask, train)
    return x


class PatchEmbed(nn.Module):
  """timm `patch_embed`: a conv with kernel = stride = patch, flattened to tokens."""

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.config.patch_size
    x = nn.Conv(
      self.config.hidden_size,
      (p, p),
      strides=(p, p),
      padding="VALID",
      kernel_init=nn.initializers.lecun_normal(),
      dtype=self.dtype,
      name="proj",
    )(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class ViT(nn.Module):
  """ViT encoder returning all normalised tokens [N, 1 + P, D] (class token first).

  Input: normalised images [N, S, S, in_chans]. `patch_mask` ([N, P] bool, True = masked)
  hides masked patches from every attention (they still get outputs, which callers ignore).
  """

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, patch_mask: jax.Array | None = None, train: bool = False
  ) -> jax.Array:
    cfg = self.config
    if x.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_chans):
      raise ValueError(
        f"ViT expects [N, {cfg.image_size}, {cfg.image_size}, {cfg.in_chans}], got {x.shape}"
      )
    tokens = PatchEmbed(cfg, self.dtype, name="patch_embed")(x)
    cls = self.param("cls_token", _INIT, (1, 1, cfg.hidden_size))
    pos = self.param("pos_embed", _INIT, (1, cfg.num_patches + 1, cfg.hidden_size))
    cls = jnp.broadcast_to(cls, (x.shape[0], 1, cfg.hidden_size)).astype(tokens.dtype)
    tokens = jnp.concatenate([cls, tokens], axis=1) + pos.astype(tokens.dtype)
    tokens = nn.Dropout(cfg.dropout, deterministic=not train)(tokens)
    key_mask = None
    if patch_mask is not None:
      keep_cls = jnp.ones((x.shape[0], 1), jnp.bool_)
      key_mask = jnp.concatenate([keep_cls, ~patch_mask.astype(jnp.bool_)], axis=1)
    tokens = Blocks(cfg, self.dtype, name="blocks")(tokens, key_mask, train)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="norm")(tokens)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[N, S, S, C] -> [N, P, p*p*C] in row-major patch order (the token order of `ViT`)."""
  n, s, _, c = images.shape
  g = s // patch_size
  x = images.reshape(n, g, patch_size, g, patch_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, patch_size * patch_size * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """Inverse of `patchify`: [N, P, p*p*C] -> [N, S, S, C]."""
  n, num, _ = patches.shape
  g = round(num**0.5)
  x = patches.reshape(n, g, g, patch_size, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, g * patch_size, g * patch_size, channels)
