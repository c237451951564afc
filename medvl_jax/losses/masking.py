"""Masks for masked language modeling and multi-scale masked vision modeling.

Pure, jittable functions with static shapes; each takes its own `jax.random` key (the model
draws them from the 'masking' rng stream, separate from 'dropout').
"""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from medvl_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TextMaskConfig:
  """BERT-style MLM corruption (Devlin et al. 2019: 15%, then 80% [MASK] / 10% random / 10%)."""

  prob: float
  mask_frac: float
  random_frac: float
  mask_token_id: int
  special_token_ids: tuple[int, ...]
  vocab_size: int
  # The model predicts at most this many selected positions per row, the first ones in
  # position order (BERT's max_predictions_per_seq); 0 = every position (no gather). Only the
  # vocabulary logits of these positions are computed: the MLM head's cost then scales with
  # K, not with the sequence length.
  max_predictions: int = 0

  def __post_init__(self):
    _check_ratio("model.masking.text.prob", self.prob)
    if self.max_predictions < 0:
      raise ConfigError(
        f"model.masking.text.max_predictions={self.max_predictions}: expected >= 0 "
        "(0 = every position)"
      )
    if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1:
      raise ConfigError(
        "model.masking.text: mask_frac and random_frac must be >= 0 and sum "
        f"to <= 1, got {self.mask_frac} and {self.random_frac}"
      )


@dataclasses.dataclass(frozen=True)
class ImageMaskConfig:
  """Multi-scale block masks: scale k masks blocks of scales[k] x scales[k] patches."""

  grid: int
  scales: tuple[int, ...]
  ratios: tuple[float, ...]

  def __post_init__(self):
    if not self.scales or len(self.scales) != len(self.ratios):
      raise ConfigError(
        "model.masking.image: scales and ratios must be non-empty and of equal "
        f"length, got {self.scales} and {self.ratios}"
      )
    for s, r in zip(self.scales, self.ratios):
      _check_ratio(f"model.masking.image.ratios (scale {s})", r)
      if s < 1 or s > self.grid:
        raise ConfigError(
          f"model.masking.image.scales: block {s}x{s} patches does not fit the "
          f"{self.grid}x{self.grid} patch grid"
        )
      nb = math.ceil(self.grid / s)
      if not 0 < round(r * nb * nb) < nb * nb:
        raise ConfigError(
          f"model.masking.image: ratio {r} at scale {s}x{s} masks "
          f"{round(r * nb * nb)} of the {nb * nb} blocks of the "
          f"{self.grid}x{self.grid} patch grid; it must mask some but not all"
        )


def _check_ratio(name: str, value: float) -> None:
  if not 0.0 < value < 1.0:
    raise ConfigError(f"{name}: mask ratio {value} is outside (0, 1)")


def mlm_mask(
  key: jax.Array,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  has_text: jax.Array,
  cfg: TextMaskConfig,
) -> dict[str, jax.Array]:
  """Draws MLM targets and the corrupted input.

  Each candidate token (attention_mask > 0, not a special id, row has text) is selected with
  probability `prob`; a selected token becomes [MASK] with probability mask_frac, a uniformly
  random vocabulary id with probability random_frac, and is kept otherwise.

  Returns:
    {'input_ids': corrupted ids [B, L], 'targets': original ids [B, L],
     'weights': bool [B, L], True exactly at the selected positions}.
  """
  k_sel, k_how, k_rand = jax.random.split(key, 3)
  ids = jnp.asarray(input_ids)
  special = jnp.isin(ids, jnp.asarray(cfg.special_token_ids, ids.dtype))
  candidate = (jnp.asarray(attention_mask) > 0) & ~special & has_text.astype(bool)[:, None]
  selected = candidate & (jax.random.uniform(k_sel, ids.shape) < cfg.prob)
  u = jax.random.uniform(k_how, ids.shape)
  to_mask = selected & (u < cfg.mask_frac)
  to_random = selected & (u >= cfg.mask_frac) & (u < cfg.mask_frac + cfg.random_frac)
  random_ids = jax.random.randint(k_rand, ids.shape, 0, cfg.vocab_size, ids.dtype)
  corrupted = jnp.where(to_mask, jnp.asarray(cfg.mask_token_id, ids.dtype), ids)
  corrupted = jnp.where(to_random, random_ids, corrupted)
  return {"input_ids": corrupted, "targets": ids, "weights": selected}


def block_mask(key: jax.Array, batch: int, grid: int, block: int, ratio: float) -> jax.Array:
  """[batch, grid*grid] bool patch mask made of `block` x `block` squares.

  The grid is tiled by ceil(grid / block)^2 blocks (edge blocks are cropped); exactly
  round(ratio * blocks) of them are masked per example, so the realised patch ratio equals
  `ratio` up to that rounding and the cropped edges.
  """
  nb = math.ceil(grid / block)
  num_masked = round(ratio * nb * nb)
  noise = jax.random.uniform(key, (batch, nb * nb))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  blocks = (ranks < num_masked).reshape(batch, nb, nb)
  patches = jnp.repeat(jnp.repeat(blocks, block, axis=1), block, axis=2)[:, :grid, :grid]
  return patches.reshape(batch, grid * grid)


def multiscale_mask(
  key: jax.Array, batch: int, cfg: ImageMaskConfig
) -> tuple[jax.Array, jax.Array]:
  """One scale per example, round-robin from a random offset (balanced scales every batch).

  Returns:
    (patch_mask bool [B, P] with True = masked, scale_id int32 [B] indexing cfg.scales).
  """
  k_offset, *k_scales = jax.random.split(key, 1 + len(cfg.scales))
  masks = jnp.stack(
    [block_mask(k, batch, cfg.grid, s, r) for k, s, r in zip(k_scales, cfg.scales, cfg.ratios)]
  )  # [K, B, P]
  offset = jax.random.randint(k_offset, (), 0, len(cfg.scales))
  scale_id = ((jnp.arange(batch) + offset) % len(cfg.scales)).astype(jnp.int32)
  return masks[scale_id, jnp.arange(batch)], scale_id


def text_config(masking_cfg: Any, vocab_size: int) -> TextMaskConfig:
  """From `config.model.masking.text`."""
  t = masking_cfg.text
  return TextMaskConfig(
    prob=t.prob,
    mask_frac=t.mask_frac,
    random_frac=t.random_frac,
    mask_token_id=t.mask_token_id,
    special_token_ids=tuple(t.special_token_ids),
    vocab_size=vocab_size,
    max_predictions=int(t.max_predictions),
  )


def image_config(masking_cfg: Any, grid: int) -> ImageMaskConfig:
  """From `config.model.masking.image`."""
  i = masking_cfg.image
  return ImageMaskConfig(
    grid=grid, scales=tuple(int(s) for s in i.scales), ratios=tuple(float(r) for r in i.ratios)
  )


def scale_names(scales: Sequence[int]) -> tuple[str, ...]:
  """Metric suffixes, e.g. ('1x1', '2x2', '4x4')."""
  return tuple(f"{s}x{s}" for s in scales)
