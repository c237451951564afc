"""The mixed-data family: ViT + BERT with co-attention fusion, trained with MLM, multi-scale
masked vision modeling and a contrastive term on the paired rows (models/mixed.py).

One batch mixes paired, image-only and text-only rows; every loss is masked by `has_image` /
`has_text` (and by `mask` in eval batches), so the family needs nothing else from the trainer.
Random streams: `dropout` (the step key) and `masking` (derived from it).
"""

from collections.abc import Mapping
from typing import Any

import jax

from medvl_jax.families import Family, Split, text_tower_mask
from medvl_jax.losses import mixed as mixed_objective
from medvl_jax.models import mixed as mixed_model

_MASKING_SALT = 0x6D61736B  # 'mask': the masking stream is independent of dropout's.


def init(model, batch: dict, rng: jax.Array) -> dict:
  return mixed_model.init(model, rng, batch)


def forward_and_loss(
  model: mixed_model.MixedModel,
  variables: Mapping[str, Any],
  batch: Mapping[str, jax.Array],
  rngs: Mapping[str, jax.Array],
  loss_cfg: Any,
  train: bool,
  mesh: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The model's forward pass and the mixed objective: (total loss, metrics) on a whole batch.

  `rngs` must hold 'masking' (and 'dropout' when train). Differentiate w.r.t.
  `variables['params']` with `jax.value_and_grad(..., has_aux=True)`. `mesh`: the batch's
  mesh, for the contrastive term's `loss_cfg.impl` (`losses.contrastive.loss`).
  """
  outputs = model.apply(variables, batch, train=train, rngs=dict(rngs))
  return mixed_objective.loss(outputs, batch, loss_cfg, model.scale_names, mesh)


def _eval_batch(batch: dict) -> dict:
  """Padding rows of an eval batch (mask False) carry neither modality: no loss sees them."""
  if "mask" not in batch:
    return batch
  keep = batch["mask"].astype(bool)
  return dict(batch, has_image=batch["has_image"] & keep, has_text=batch["has_text"] & keep)


def make_loss(config, mesh=None):
  loss_cfg = config.loss

  def loss_fn(model, variables, batch: dict, rng, train: bool):
    # Eval: a fixed masking key, so validation losses are comparable across evaluations.
    key = rng if rng is not None else jax.random.key(config.seed)
    rngs = {"masking": jax.random.fold_in(key, _MASKING_SALT)}
    if train:
      rngs["dropout"] = key
    loss, metrics = forward_and_loss(
      model, variables, _eval_batch(batch), rngs, loss_cfg, train, mesh
    )
    metrics = {k: v for k, v in metrics.items() if k != "loss"}
    return loss, metrics, variables.get("batch_stats", {})

  return loss_fn


def make_split(config, mesh=None) -> Split:
  """The training loss in parts: the MLM/MVM masks are drawn once for the whole batch (the
  same 'masking' key as `make_loss`), so each micro-batch sees its rows' masks; MLM and MVM
  add up as sums and counts (`losses.mixed.sums`), the contrastive term is over all pairs."""
  loss_cfg = config.loss

  def prepare(model, variables, batch, rng):
    rngs = {"masking": jax.random.fold_in(rng, _MASKING_SALT)}
    return model.apply(variables, batch, method=type(model).draw_masks, rngs=rngs)

  def micro(model, variables, batch, masks, rng):
    out = model.apply(variables, batch, train=True, masks=masks, rngs={"dropout": rng})
    sums = mixed_objective.sums(out, batch, model.scale_names)
    return (out["image_embed"], out["text_embed"]), sums, variables.get("batch_stats", {})

  def combine(model, image_embed, text_embed, sums, batch):
    pair = batch["has_image"].astype(bool) & batch["has_text"].astype(bool)
    loss, metrics = mixed_objective.combine(
      image_embed, text_embed, pair, sums, loss_cfg, model.scale_names, mesh
    )
    return loss, {k: v for k, v in metrics.items() if k != "loss"}

  return Split(prepare=prepare, micro=micro, combine=combine)


def encode_image(model, variables, images):
  h = model.apply(variables, images, method=type(model).encode_image)
  return h, model.apply(variables, images, method=type(model).embed_image)


def encode_text(model, variables, ids, mask):
  return model.apply(variables, ids, mask, method=type(model).embed_text)


def check_config(model_cfg) -> None:
  """Nested choices of the mixed model, checked by building it (no I/O, no parameters)."""
  mixed_model.from_config(model_cfg)


FAMILY = Family(
  name="mixed",
  build=mixed_model.from_config,
  init=init,
  make_loss=make_loss,
  metrics=(
    "mlm",
    "mvm",
    "contrastive",
    "mlm_acc",
    "mlm_tokens",
    "mvm_patches",
    "pairs",
    "loss_i2t",
    "loss_t2i",
    "acc_i2t",
    "acc_t2i",
  ),
  summary_metrics=("mlm", "mvm", "contrastive"),
  trainable_mask=text_tower_mask,
  encode_image=encode_image,
  encode_text=encode_text,
  check_config=check_config,
  losses=("mixed",),  # MLM + multi-scale MVM + InfoNCE on pairs (losses.mixed.loss)
  make_split=make_split,
)
