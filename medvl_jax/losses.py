"""Losses. InfoNCE: ConVIRT's asymmetric bidirectional form over the *global* batch.

Every function here is pure and shape-polymorphic; under `jax.jit` with a batch sharded over a
mesh, XLA computes the N x N similarity across devices, so the loss means the same thing on one
CPU or a pod: it is always the loss of the whole global batch.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -1e9  # logit for excluded (padding) columns; finite so 0 * _NEG stays 0.


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def infonce(
  image_embed: Array,
  text_embed: Array,
  *,
  lam: float,
  temperature: float,
  mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Asymmetric bidirectional InfoNCE (ConVIRT eq. 2-3).

  L = 1/N sum_i [lam * l_i(v->u) + (1 - lam) * l_i(u->v)], with cosine similarity over the
  temperature. lam = 0.5 is the symmetric CLIP form; ConVIRT uses 0.75.

  Args:
    image_embed: [N, d] unnormalised image projections v.
    text_embed: [N, d] unnormalised text projections u; row i is paired with image row i.
    lam: weight of the image->text direction.
    temperature: tau.
    mask: optional [N] bool; False rows (batch padding) are neither anchors nor candidates.

  Returns:
    (scalar loss, metrics) where metrics holds the two directional losses and top-1 accuracies.
  """
  v = l2_normalize(image_embed.astype(jnp.float32))
  u = l2_normalize(text_embed.astype(jnp.float32))
  logits = v @ u.T / temperature  # [N_img, N_txt]
  n = logits.shape[0]
  valid = jnp.ones((n,), jnp.bool_) if mask is None else mask.astype(jnp.bool_)
  col_ok = valid[None, :]
  logits_v2u = jnp.where(col_ok, logits, _NEG)
  logits_u2v = jnp.where(col_ok, logits.T, _NEG)
  diag = jnp.arange(n)
  l_v2u = -jax.nn.log_softmax(logits_v2u, axis=1)[diag, diag]
  l_u2v = -jax.nn.log_softmax(logits_u2v, axis=1)[diag, diag]
  w = valid.astype(jnp.float32)
  count = jnp.maximum(w.sum(), 1.0)

  def mean(x):
    return jnp.sum(jnp.where(valid, x, 0.0)) / count

  loss = mean(lam * l_v2u + (1.0 - lam) * l_u2v)
  metrics = {
    "loss_i2t": mean(l_v2u),
    "loss_t2i": mean(l_u2v),
    "acc_i2t": mean((jnp.argmax(logits_v2u, axis=1) == diag).astype(jnp.float32)),
    "acc_t2i": mean((jnp.argmax(logits_u2v, axis=1) == diag).astype(jnp.float32)),
  }
  return loss, metrics


def convirt_loss(outputs: dict[str, Array], cfg, mask: Array | None = None):
  """Loss-registry adapter: model outputs + config.loss -> (loss, metrics)."""
  return infonce(
    outputs["image_embed"],
    outputs["text_embed"],
    lam=cfg.lam,
    temperature=cfg.temperature,
    mask=mask,
  )


# Registry: config.loss.name -> fn(outputs, loss_cfg, mask) -> (loss, metrics).
LOSSES: dict[str, Callable] = {"infonce": convirt_loss}


# --- Mixed-data masked pretraining (METHODS.md) ----------------------------------------------
# Each term is a mean over the *global* batch of the positions it is defined on (masked tokens,
# masked patches of image rows, paired rows), so rows of another kind contribute exactly zero
# value and zero gradient and one batch may mix paired, image-only and text-only examples.


def mlm_loss(logits: Array, targets: Array, weights: Array) -> tuple[Array, dict[str, Array]]:
  """Cross-entropy over the selected (masked) positions only.

  Args:
    logits: [B, L, V] vocabulary logits.
    targets: [B, L] original token ids.
    weights: [B, L] bool, True at MLM targets (already False in rows without text).

  Returns:
    (mean loss over targets, {'mlm_acc', 'mlm_tokens'}); 0 when there is no target.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = weights.astype(jnp.bool_)
  count = jnp.sum(w)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  loss = jnp.sum(jnp.where(w, nll, 0.0)) / denom
  correct = (jnp.argmax(logits, axis=-1) == targets) & w
  return loss, {"mlm_acc": jnp.sum(correct) / denom, "mlm_tokens": count.astype(jnp.float32)}


def normalise_patches(patches: Array, eps: float = 1e-6) -> Array:
  """Per-patch normalised pixel targets (MAE `norm_pix_loss`): (x - mean) / sqrt(var + eps)."""
  patches = patches.astype(jnp.float32)
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def mvm_loss(
  pred: Array,
  target: Array,
  patch_mask: Array,
  scale_id: Array,
  has_image: Array,
  scale_weights: Sequence[float],
  scale_names: Sequence[str],
) -> tuple[Array, dict[str, Array]]:
  """Multi-scale masked vision modeling: mean squared error on masked patches only.

  Per scale k: mean over the masked patches of image rows drawn at scale k of the per-patch
  mean squared pixel error; the loss is sum_k scale_weights[k] * L_k.

  Args:
    pred: [B, P, D] predicted pixels per patch.
    target: [B, P, D] target pixels per patch (already normalised if so configured).
    patch_mask: [B, P] bool, True = masked.
    scale_id: [B] int, the scale each row was masked at.
    has_image: [B] bool.
    scale_weights, scale_names: one per scale.

  Returns:
    (loss, {'mvm_<name>': L_k, 'mvm_patches': masked patches counted}).
  """
  err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  counted = patch_mask.astype(jnp.bool_) & has_image.astype(jnp.bool_)[:, None]
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for k, (w, name) in enumerate(zip(scale_weights, scale_names)):
    sel = counted & (scale_id == k)[:, None]
    loss_k = jnp.sum(jnp.where(sel, err, 0.0)) / jnp.maximum(jnp.sum(sel), 1).astype(jnp.float32)
    metrics[f"mvm_{name}"] = loss_k
    total = total + w * loss_k
  metrics["mvm_patches"] = jnp.sum(counted).astype(jnp.float32)
  return total, metrics


def mixed_loss(
  outputs: dict[str, Array], batch: dict[str, Array], cfg, scale_names: Sequence[str]
) -> tuple[Array, dict[str, Array]]:
  """MLM + multi-scale MVM + contrastive, each masked by has_image / has_text.

  Args:
    outputs: `medvl_jax.models.mixed.MixedModel` outputs.
    batch: the batch layout (uses has_image, has_text).
    cfg: config.loss: mlm_weight, mvm_weight, contrastive_weight, mvm_scale_weights, lam,
      temperature. (Target normalisation is the model's: `model.decoder.norm_pix_target`.)
    scale_names: one per MVM scale (metric names).

  Returns:
    (total, metrics) with 'loss', 'mlm', 'mvm', 'contrastive', 'mvm_<scale>' and counts.
  """
  has_image = batch["has_image"].astype(jnp.bool_)
  has_text = batch["has_text"].astype(jnp.bool_)
  mlm, mlm_metrics = mlm_loss(
    outputs["mlm_logits"], outputs["mlm_targets"], outputs["mlm_weights"] & has_text[:, None]
  )
  mvm, mvm_metrics = mvm_loss(
    outputs["mvm_pred"],
    outputs["mvm_target"],
    outputs["patch_mask"],
    outputs["scale_id"],
    has_image,
    tuple(cfg.mvm_scale_weights),
    scale_names,
  )
  pair = has_image & has_text
  con, con_metrics = infonce(
    outputs["image_embed"],
    outputs["text_embed"],
    lam=cfg.lam,
    temperature=cfg.temperature,
    mask=pair,
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
