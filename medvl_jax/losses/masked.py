"""Masked modeling losses: MLM over the masked tokens, multi-scale MVM over the masked patches.

Each is a mean over the *global* batch of the positions it is defined on (masked tokens, masked
patches of image rows), so rows without the modality contribute exactly zero value and zero
gradient. The `*_sums` forms hold additive statistics (sums and counts) of a set of rows; the
`*_from_sums` forms turn those of the whole batch into the loss, so a batch split into
micro-batches has the loss of the whole. The masks themselves are `masking`'s.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def mlm_sums(logits: Array, targets: Array, weights: Array) -> dict[str, Array]:
  """Additive MLM statistics of a set of rows: summed NLL, hits and count of the targets."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = weights.astype(jnp.bool_)
  correct = (jnp.argmax(logits, axis=-1) == targets) & w
  return {
    "mlm_nll": jnp.sum(jnp.where(w, nll, 0.0)),
    "mlm_correct": jnp.sum(correct).astype(jnp.float32),
    "mlm_tokens": jnp.sum(w).astype(jnp.float32),
  }


def mlm_from_sums(sums: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
  """`mlm_loss` from the `mlm_sums` of the whole batch."""
  denom = jnp.maximum(sums["mlm_tokens"], 1.0)
  return sums["mlm_nll"] / denom, {
    "mlm_acc": sums["mlm_correct"] / denom,
    "mlm_tokens": sums["mlm_tokens"],
  }


def mlm_loss(logits: Array, targets: Array, weights: Array) -> tuple[Array, dict[str, Array]]:
  """Cross-entropy over the selected (masked) positions only.

  Args:
    logits: [B, L, V] vocabulary logits.
    targets: [B, L] original token ids.
    weights: [B, L] bool, True at MLM targets (already False in rows without text).

  Returns:
    (mean loss over targets, {'mlm_acc', 'mlm_tokens'}); 0 when there is no target.
  """
  return mlm_from_sums(mlm_sums(logits, targets, weights))


def normalise_patches(patches: Array, eps: float = 1e-6) -> Array:
  """Per-patch normalised pixel targets (MAE `norm_pix_loss`): (x - mean) / sqrt(var + eps)."""
  patches = patches.astype(jnp.float32)
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def mvm_sums(
  pred: Array,
  target: Array,
  patch_mask: Array,
  scale_id: Array,
  has_image: Array,
  scale_names: Sequence[str],
) -> dict[str, Array]:
  """Additive MVM statistics of a set of rows: per scale, the summed per-patch squared error
  over its masked patches ('mvm_err_<name>') and their count ('mvm_count_<name>')."""
  err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  counted = patch_mask.astype(jnp.bool_) & has_image.astype(jnp.bool_)[:, None]
  out = {"mvm_patches": jnp.sum(counted).astype(jnp.float32)}
  for k, name in enumerate(scale_names):
    sel = counted & (scale_id == k)[:, None]
    out[f"mvm_err_{name}"] = jnp.sum(jnp.where(sel, err, 0.0))
    out[f"mvm_count_{name}"] = jnp.sum(sel).astype(jnp.float32)
  return out


def mvm_from_sums(
  sums: dict[str, Array], scale_weights: Sequence[float], scale_names: Sequence[str]
) -> tuple[Array, dict[str, Array]]:
  """`mvm_loss` from the `mvm_sums` of the whole batch."""
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for w, name in zip(scale_weights, scale_names):
    loss_k = sums[f"mvm_err_{name}"] / jnp.maximum(sums[f"mvm_count_{name}"], 1.0)
    metrics[f"mvm_{name}"] = loss_k
    total = total + w * loss_k
  metrics["mvm_patches"] = sums["mvm_patches"]
  return total, metrics


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
  sums = mvm_sums(pred, target, patch_mask, scale_id, has_image, scale_names)
  return mvm_from_sums(sums, scale_weights, scale_names)
