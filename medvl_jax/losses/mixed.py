"""The mixed-data objective (docs/METHODS.md): MLM + multi-scale MVM + contrastive on the pairs.

Each term is a mean over the *global* batch of the positions it is defined on (masked tokens,
masked patches of image rows, paired rows), so rows of another kind contribute exactly zero
value and zero gradient and one batch may mix paired, image-only and text-only examples.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from medvl_jax.losses import contrastive, masked

Array = jax.Array


def sums(
  outputs: dict[str, Array], batch: dict[str, Array], scale_names: Sequence[str]
) -> dict[str, Array]:
  """The MLM and MVM statistics of `loss` that add up over any split of the rows (sums and
  counts): what embedding-cache accumulation collects per micro-batch."""
  has_text = batch["has_text"].astype(jnp.bool_)
  return {
    **masked.mlm_sums(
      outputs["mlm_logits"], outputs["mlm_targets"], outputs["mlm_weights"] & has_text[:, None]
    ),
    **masked.mvm_sums(
      outputs["mvm_pred"],
      outputs["mvm_target"],
      outputs["patch_mask"],
      outputs["scale_id"],
      batch["has_image"],
      scale_names,
    ),
  }


def combine(
  image_embed: Array,
  text_embed: Array,
  pair: Array,
  sums: dict[str, Array],
  cfg,
  scale_names: Sequence[str],
  mesh=None,
) -> tuple[Array, dict[str, Array]]:
  """`loss` from the whole batch's embeddings, its paired-row mask and `sums`."""
  mlm, mlm_metrics = masked.mlm_from_sums(sums)
  mvm, mvm_metrics = masked.mvm_from_sums(sums, tuple(cfg.mvm_scale_weights), scale_names)
  con, con_metrics = contrastive.loss(
    image_embed,
    text_embed,
    lam=cfg.lam,
    temperature=cfg.temperature,
    mask=pair,
    impl=cfg.impl,
    mesh=mesh,
  )
  total = cfg.mlm_weight * mlm + cfg.mvm_weight * mvm + cfg.contrastive_weight * con
  metrics = {
    "loss": total,
    "mlm": mlm,
    "mvm": mvm,
    "contrastive": con,
    "pairs": jnp.sum(pair).astype(jnp.float32),
    **mlm_metrics,
    **mvm_metrics,
    **con_metrics,
  }
  return total, metrics


def loss(
  outputs: dict[str, Array], batch: dict[str, Array], cfg, scale_names: Sequence[str], mesh=None
) -> tuple[Array, dict[str, Array]]:
  """MLM + multi-scale MVM + contrastive, each masked by has_image / has_text.

  Args:
    outputs: `medvl_jax.models.mixed.MixedModel` outputs.
    batch: the batch layout (uses has_image, has_text).
    cfg: config.loss: mlm_weight, mvm_weight, contrastive_weight, mvm_scale_weights, lam,
      temperature, impl. (Target normalisation is the model's: `model.decoder.norm_pix_target`.)
    scale_names: one per MVM scale (metric names).
    mesh: the batch's mesh for the contrastive term's `impl` (see `contrastive.loss`).

  Returns:
    (total, metrics) with 'loss', 'mlm', 'mvm', 'contrastive', 'mvm_<scale>' and counts.
  """
  pair = batch["has_image"].astype(jnp.bool_) & batch["has_text"].astype(jnp.bool_)
  return combine(
    outputs["image_embed"],
    outputs["text_embed"],
    pair,
    sums(outputs, batch, scale_names),
    cfg,
    scale_names,
    mesh,
  )
