"""Losses: pure, shape-polymorphic functions of model outputs, each the loss of the *global* batch.

  contrastive  ConVIRT's asymmetric bidirectional InfoNCE (lam = 0.5: the symmetric CLIP form),
               its N x N similarity laid out dense, gathered or around a ring
               (`config.loss.impl`), and the ConVIRT family's adapter.
  masked       MLM over the masked tokens, multi-scale MVM over the masked patches (mean squared
               error against per-patch-normalised pixels), as additive sums and as losses.
  masking      the MLM corruption and the multi-scale block masks the mixed model draws.
  mixed        the mixed-data objective: MLM + MVM + contrastive on the paired rows, each masked
               by `has_image` / `has_text`.

`LOSSES` maps `config.loss.name` to a loss on model outputs. The mixed family computes its
objective itself (`families/mixed.py`, with `mixed`); each family names the `config.loss.name`
values it trains with (`Family.losses`).
"""

from collections.abc import Callable

from medvl_jax.losses import contrastive

# config.loss.name -> fn(outputs, loss_cfg, mask, mesh) -> (loss, metrics).
LOSSES: dict[str, Callable] = {"infonce": contrastive.convirt_loss}
