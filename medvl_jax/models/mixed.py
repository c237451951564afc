"""Mixed-data masked pretraining model: ViT + BERT stacks, co-attention fusion, three heads.

One forward pass on the agreed batch layout (image uint8 [B, S, S, 1], input_ids,
attention_mask, has_image, has_text) draws the MLM and multi-scale MVM masks from the
'masking' rng stream, encodes the masked image (ViT; masked patches hidden from attention) and
the corrupted text (BERT), projects the pooled unimodal features for the contrastive term,
fuses both in co-attention layers where each modality attends to the other only in rows that
have it, and predicts the masked tokens (MLM head tied to the word embeddings) and the masked
pixels (a light MAE-style decoder). Its family (`medvl_jax.families.mixed`) turns the
outputs of a batch into the loss.
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvl_jax.errors import ConfigError
from medvl_jax.losses import masked, masking
from medvl_jax.models import vit
from medvl_jax.models.bert import BertModel
from medvl_jax.models.convirt import DTYPES, ProjectionHead, text_config

_INIT = nn.initializers.truncated_normal(stddev=0.02)
_NEG = -1e9
IMAGE_POOLS = ("cls", "mean")
TEXT_POOLS = ("max", "mean", "cls")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  num_layers: int
  num_heads: int
  mlp_ratio: float
  dropout: float


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_ratio: float
  norm_pix_target: bool


class CrossAttention(nn.Module):
  """Queries of one modality attend to keys/values of the other (projected to query width)."""

  hidden_size: int
  num_heads: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    n, lq, _ = x.shape
    lk = ctx.shape[1]
    hd = self.hidden_size // self.num_heads

    def dense(name):
      return nn.Dense(self.hidden_size, kernel_init=_INIT, dtype=self.dtype, name=name)

    q = dense("query")(x).reshape(n, lq, self.num_heads, hd)
    k = dense("key")(ctx).reshape(n, lk, self.num_heads, hd)
    v = dense("value")(ctx).reshape(n, lk, self.num_heads, hd)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) * hd**-0.5
    logits = jnp.where(key_mask[:, None, None, :], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.dropout, deterministic=not train)(probs)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, lq, self.hidden_size)
    out = dense("out")(out)
    # A row whose keys are all excluded (the other modality is absent) gets no update at all:
    # its uniform softmax over excluded keys is multiplied by zero, so neither value nor
    # gradient flows from the missing modality.
    return out * jnp.any(key_mask, axis=1)[:, None, None].astype(out.dtype)


class FusionLayer(nn.Module):
  """LXMERT/M3AE-style co-attention: both cross-attentions read the layer input, then each
  modality runs a pre-norm self-attention + MLP block (a `vit.Block`)."""

  text_size: int
  image_size: int
  config: FusionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, t: jax.Array, i: jax.Array, text_keys: jax.Array, image_keys: jax.Array, train: bool
  ) -> tuple[jax.Array, jax.Array]:
    cfg = self.config

    def ln(name):
      return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)

    tn, im = ln("text_norm"), ln("image_norm")
    t_norm, i_norm = tn(t), im(i)
    drop = nn.Dropout(cfg.dropout, deterministic=not train)
    t2 = t + drop(
      CrossAttention(self.text_size, cfg.num_heads, cfg.dropout, self.dtype, name="text_to_image")(
        t_norm, i_norm, image_keys, train
      )
    )
    i2 = i + drop(
      CrossAttention(self.image_size, cfg.num_heads, cfg.dropout, self.dtype, name="image_to_text")(
        i_norm, t_norm, text_keys, train
      )
    )

    def block(size, name):
      return vit.Block(
        size,
        cfg.num_heads,
        int(size * cfg.mlp_ratio),
        1e-6,
        cfg.dropout,
        cfg.dropout,
        self.dtype,
        name=name,
      )

    return (
      block(self.text_size, "text_block")(t2, text_keys, train),
      block(self.image_size, "image_block")(i2, image_keys, train),
    )


class MLMHead(nn.Module):
  """BERT's prediction head: dense + gelu + LayerNorm, decoder tied to the word embeddings."""

  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
    x = nn.Dense(x.shape[-1], kernel_init=_INIT, dtype=self.dtype, name="dense")(x)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(
      nn.gelu(x, approximate=False)
    )
    bias = self.param("bias", nn.initializers.zeros, (word_embeddings.shape[0],))
    return x @ word_embeddings.T.astype(x.dtype) + bias


class PixelDecoder(nn.Module):
  """MAE-style light decoder: embed, mask tokens at masked patches, positions, narrow blocks,
  a linear map to the grey pixels of each patch."""

  config: DecoderConfig
  num_patches: int
  patch_pixels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array, patch_mask: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    x = nn.Dense(cfg.hidden_size, kernel_init=_INIT, dtype=self.dtype, name="embed")(patches)
    mask_token = self.param("mask_token", _INIT, (1, 1, cfg.hidden_size))
    x = jnp.where(patch_mask[..., None], mask_token.astype(x.dtype), x)
    x = x + self.param("pos_embed", _INIT, (1, self.num_patches, cfg.hidden_size))
    for k in range(cfg.num_layers):
      x = vit.Block(
        cfg.hidden_size,
        cfg.num_heads,
        int(cfg.hidden_size * cfg.mlp_ratio),
        1e-6,
        dtype=self.dtype,
        name=f"block{k}",
      )(x, None, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    return nn.Dense(self.patch_pixels, kernel_init=_INIT, dtype=self.dtype, name="pred")(x)


class MixedModel(nn.Module):
  """Submodules: `image` (timm-named ViT), `text` (HF-named BERT), `fusion_layers_N`, `mlm_head`,
  `decoder`, `image_proj`, `text_proj`. Every size and choice comes from `from_config`."""

  vit_config: vit.ViTConfig
  text_encoder: nn.Module
  fusion: FusionConfig
  decoder_config: DecoderConfig
  text_mask: masking.TextMaskConfig
  image_mask: masking.ImageMaskConfig
  projection_dim: int
  projection_hidden: int
  image_mean: Sequence[float]
  image_std: Sequence[float]
  image_pool: str
  text_pool: str
  dtype: Any = jnp.float32

  def setup(self):
    self.image = vit.ViT(self.vit_config, self.dtype)
    self.text = self.text_encoder.clone(parent=self, name="text")
    tsize = self.text_encoder.config.hidden_size
    self.fusion_layers = [
      FusionLayer(tsize, self.vit_config.hidden_size, self.fusion, self.dtype)
      for _ in range(self.fusion.num_layers)
    ]
    self.mlm_head = MLMHead(self.text_encoder.config.layer_norm_eps, self.dtype)
    self.decoder = PixelDecoder(
      self.decoder_config, self.vit_config.num_patches, self.vit_config.patch_size**2, self.dtype
    )
    self.image_proj = ProjectionHead(self.projection_hidden, self.projection_dim, self.dtype)
    self.text_proj = ProjectionHead(self.projection_hidden, self.projection_dim, self.dtype)

  @property
  def scale_names(self) -> tuple[str, ...]:
    return masking.scale_names(self.image_mask.scales)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """uint8 [N, S, S, 1] in 0..255 -> normalised float32 [N, S, S, in_chans]."""
    if images.ndim != 4 or images.shape[-1] != 1:
      raise ValueError(f"images must be grey [N, H, W, 1], got shape {images.shape}")
    x = jnp.tile(images.astype(jnp.float32) / 255.0, (1, 1, 1, self.vit_config.in_chans))
    return (x - jnp.asarray(self.image_mean)) / jnp.asarray(self.image_std)

  def pixel_targets(self, images: jax.Array) -> jax.Array:
    """Grey pixels in 0..1 per patch [N, P, p*p], per-patch normalised if configured."""
    patches = vit.patchify(images.astype(jnp.float32) / 255.0, self.vit_config.patch_size)
    return masked.normalise_patches(patches) if self.decoder_config.norm_pix_target else patches

  def _pool_image(self, tokens: jax.Array, patch_mask: jax.Array | None) -> jax.Array:
    if self.image_pool == "cls":
      return tokens[:, 0]
    patches = tokens[:, 1:]
    keep = (jnp.ones(patches.shape[:2], bool) if patch_mask is None else ~patch_mask)[..., None]
    return jnp.sum(jnp.where(keep, patches, 0), 1) / jnp.maximum(jnp.sum(keep, 1), 1)

  def _pool_text(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    valid = (jnp.asarray(attention_mask) > 0)[..., None]
    if self.text_pool == "cls":
      return hidden[:, 0]
    if self.text_pool == "mean":
      return jnp.sum(jnp.where(valid, hidden, 0), 1) / jnp.maximum(jnp.sum(valid, 1), 1)
    pooled = jnp.max(jnp.where(valid, hidden, jnp.finfo(hidden.dtype).min), axis=1)
    return jnp.where(jnp.any(valid, axis=1), pooled, jnp.zeros_like(pooled))

  # --- Encoders for evaluators (no masking, no fusion) ----------------------------------------
  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Raw grey images (0..255) -> pooled image features h_v [N, D_v]."""
    return self._pool_image(self.image(self.preprocess(images), None, train), None)

  def encode_text(
    self, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False
  ) -> jax.Array:
    """Token ids -> pooled text features h_u [N, D_u]."""
    return self._pool_text(self.text(input_ids, attention_mask, train=train), attention_mask)

  def embed_image(self, images: jax.Array) -> jax.Array:
    """Raw images -> contrastive image embedding (unnormalised) [N, d]."""
    return self.image_proj(self.encode_image(images))

  def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Token ids -> contrastive text embedding (unnormalised) [N, d]."""
    return self.text_proj(self.encode_text(input_ids, attention_mask))

  # --- Masks ---------------------------------------------------------------------------------
  def draw_masks(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """MLM and MVM masks from the 'masking' rng stream."""
    k_text, k_image = jax.random.split(self.make_rng("masking"))
    mlm = masking.mlm_mask(
      k_text, batch["input_ids"], batch["attention_mask"], batch["has_text"], self.text_mask
    )
    patch_mask, scale_id = masking.multiscale_mask(
      k_image, batch["input_ids"].shape[0], self.image_mask
    )
    return {
      "mlm_input_ids": mlm["input_ids"],
      "mlm_weights": mlm["weights"],
      "patch_mask": patch_mask,
      "scale_id": scale_id,
    }

  # --- Training forward ----------------------------------------------------------------------
  def __call__(
    self,
    batch: Mapping[str, jax.Array],
    train: bool = False,
    masks: Mapping[str, jax.Array] | None = None,
  ) -> dict[str, jax.Array]:
    """Masked forward pass on a whole batch; `masks` (from `draw_masks`) fixes the masks."""
    if masks is None:
      masks = self.draw_masks(batch)
    has_image = batch["has_image"].astype(bool)
    has_text = batch["has_text"].astype(bool)
    patch_mask = masks["patch_mask"]
    attention_mask = batch["attention_mask"]
    img = self.image(self.preprocess(batch["image"]), patch_mask, train)
    txt = self.text(masks["mlm_input_ids"], attention_mask, train=train)
    image_embed = self.image_proj(self._pool_image(img, patch_mask))
    text_embed = self.text_proj(self._pool_text(txt, attention_mask))
    text_keys = (attention_mask > 0) & has_text[:, None]
    image_keys = (
      jnp.concatenate([jnp.ones_like(patch_mask[:, :1]), ~patch_mask], axis=1) & has_image[:, None]
    )
    for layer in self.fusion_layers:
      txt, img = layer(txt, img, text_keys, image_keys, train)
    word_embeddings = self.text.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    mlm_targets, mlm_weights = batch["input_ids"], masks["mlm_weights"]
    if self.text_mask.max_predictions:  # only the first K selected positions of each row
      order = jnp.argsort(~mlm_weights, axis=1, stable=True)[:, : self.text_mask.max_predictions]
      txt = jnp.take_along_axis(txt, order[..., None], axis=1)
      mlm_targets = jnp.take_along_axis(mlm_targets, order, axis=1)
      mlm_weights = jnp.take_along_axis(mlm_weights, order, axis=1)
    return {
      "mlm_logits": self.mlm_head(txt, word_embeddings),  # [B, L or K, V]
      "mlm_targets": mlm_targets,
      "mlm_weights": mlm_weights,
      "mvm_pred": self.decoder(img[:, 1:], patch_mask, train),
      "mvm_target": self.pixel_targets(batch["image"]),
      "patch_mask": patch_mask,
      "scale_id": masks["scale_id"],
      "image_embed": image_embed,
      "text_embed": text_embed,
    }

  def regenerate(
    self, images: jax.Array, patch_mask: jax.Array, denorm: str = "visible"
  ) -> dict[str, jax.Array]:
    """Image-only regeneration of masked patches.

    Args:
      images: uint8 [N, S, S, 1].
      patch_mask: bool [N, P], True = masked (to regenerate).
      denorm: with per-patch-normalised targets, how predictions return to pixels: 'visible'
        scales them by the mean/std of the image's visible patches (no information from the
        masked patch); 'target' by the masked patch's own mean/std (MAE's figures; leaks the
        patch's mean and contrast, so only structure is predicted).

    Returns:
      {'pred': decoder output [N, P, p*p] (target space), 'image': float [N, S, S, 1] in
       0..255 with masked patches replaced by the prediction}.
    """
    n = images.shape[0]
    has_text = jnp.zeros((n,), bool)
    batch = {
      "image": images,
      "input_ids": jnp.zeros((n, 1), jnp.int32),
      "attention_mask": jnp.zeros((n, 1), jnp.int32),
      "has_image": jnp.ones((n,), bool),
      "has_text": has_text,
    }
    masks = {
      "mlm_input_ids": batch["input_ids"],
      "mlm_weights": jnp.zeros((n, 1), bool),
      "patch_mask": patch_mask,
      "scale_id": jnp.zeros((n,), jnp.int32),
    }
    pred = self(batch, train=False, masks=masks)["mvm_pred"].astype(jnp.float32)
    p = self.vit_config.patch_size
    raw = vit.patchify(images.astype(jnp.float32) / 255.0, p)
    pixels = pred
    if self.decoder_config.norm_pix_target:
      if denorm == "target":
        mean = raw.mean(-1, keepdims=True)
        std = jnp.sqrt(raw.var(-1, keepdims=True) + 1e-6)
      elif denorm == "visible":
        keep = ~patch_mask[..., None]
        count = jnp.maximum(keep.sum(1, keepdims=True), 1)
        mean = jnp.sum(jnp.where(keep, raw.mean(-1, keepdims=True), 0), 1, keepdims=True) / count
        std = (
          jnp.sum(jnp.where(keep, jnp.sqrt(raw.var(-1, keepdims=True) + 1e-6), 0), 1, keepdims=True)
          / count
        )
      else:
        raise ValueError(f"denorm must be 'visible' or 'target', got {denorm!r}")
      pixels = pred * std + mean
    merged = jnp.where(patch_mask[..., None], jnp.clip(pixels, 0.0, 1.0), raw)
    return {"pred": pred, "image": vit.unpatchify(merged, p, 1) * 255.0}


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def vit_config(image_cfg: Any) -> vit.ViTConfig:
  """From `config.model.image`."""
  return vit.ViTConfig(
    image_size=image_cfg.image_size,
    patch_size=image_cfg.patch_size,
    in_chans=image_cfg.in_chans,
    hidden_size=image_cfg.hidden_size,
    num_layers=image_cfg.num_layers,
    num_heads=image_cfg.num_heads,
    mlp_ratio=image_cfg.mlp_ratio,
    dropout=image_cfg.dropout,
    attention_dropout=image_cfg.attention_dropout,
  )


def from_config(model_cfg: Any) -> MixedModel:
  """Builds the model from `config.model` (an ml_collections.ConfigDict); ConfigError on bad
  values, naming the key."""
  _check(
    model_cfg.dtype in DTYPES,
    f"model.dtype: unknown {model_cfg.dtype!r}; valid: {', '.join(sorted(DTYPES))}",
  )
  dtype = DTYPES[model_cfg.dtype]
  icfg = model_cfg.image
  vcfg = vit_config(icfg)
  _check(
    len(icfg.mean) == vcfg.in_chans and len(icfg.std) == vcfg.in_chans,
    f"model.image.mean/std must have in_chans={vcfg.in_chans} values each",
  )
  _check(
    icfg.pool in IMAGE_POOLS,
    f"model.image.pool: unknown {icfg.pool!r}; valid: {', '.join(IMAGE_POOLS)}",
  )
  _check(
    model_cfg.text.pool in TEXT_POOLS,
    f"model.text.pool: unknown {model_cfg.text.pool!r}; valid: {', '.join(TEXT_POOLS)}",
  )
  bert = text_config(model_cfg.text)
  f = model_cfg.fusion
  fusion = FusionConfig(f.num_layers, f.num_heads, f.mlp_ratio, f.dropout)
  _check(f.num_layers >= 0, "model.fusion.num_layers must be >= 0")
  for what, size in (("text", bert.hidden_size), ("image", vcfg.hidden_size)):
    _check(
      size % f.num_heads == 0,
      f"model.fusion.num_heads {f.num_heads} does not divide the {what} width {size}",
    )
  d = model_cfg.decoder
  _check(
    d.hidden_size % d.num_heads == 0,
    f"model.decoder.num_heads {d.num_heads} does not "
    f"divide model.decoder.hidden_size {d.hidden_size}",
  )
  return MixedModel(
    vit_config=vcfg,
    text_encoder=BertModel(bert, dtype=dtype),
    fusion=fusion,
    decoder_config=DecoderConfig(
      d.hidden_size, d.num_layers, d.num_heads, d.mlp_ratio, d.norm_pix_target
    ),
    text_mask=masking.text_config(model_cfg.masking, bert.vocab_size),
    image_mask=masking.image_config(model_cfg.masking, vcfg.grid),
    projection_dim=model_cfg.projection_dim,
    projection_hidden=model_cfg.projection_hidden,
    image_mean=tuple(icfg.mean),
    image_std=tuple(icfg.std),
    image_pool=icfg.pool,
    text_pool=model_cfg.text.pool,
    dtype=dtype,
  )


def init(model: MixedModel, key: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
  """Initial variables ({'params': ...}) for `batch`, a batch of the layout (its values do not
  matter: `medvl_jax.data.batch.zeros` builds one)."""
  k_params, k_mask = jax.random.split(key)
  return model.init({"params": k_params, "masking": k_mask}, batch, train=False)
