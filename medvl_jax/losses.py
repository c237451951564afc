"""Losses. InfoNCE: ConVIRT's asymmetric bidirectional form over the *global* batch.

Every function here is pure and shape-polymorphic; under `jax.jit` with a batch sharded over a
mesh, XLA computes the N x N similarity across devices, so the loss means the same thing on one
CPU or a pod: it is always the loss of the whole global batch.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -1e9  # logit for excluded (padding) columns; finite so 0 * _NEG stays 0.


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def infonce(image_embed: Array, text_embed: Array, *, lam: float, temperature: float,
            mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
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
  return infonce(outputs["image_embed"], outputs["text_embed"], lam=cfg.lam,
                 temperature=cfg.temperature, mask=mask)


# Registry: config.loss.name -> fn(outputs, loss_cfg, mask) -> (loss, metrics).
LOSSES: dict[str, Callable] = {"infonce": convirt_loss}
