"""Embedding-cache gradient accumulation (GradCache, Gao et al. 2021): `config.accumulate_steps`.

A contrastive loss does not split over micro-batches (every row is a negative for every other
row), but its parameters reach it only through the embeddings. With the family's loss in parts
(`families.Split`): loss = combine(E(theta), S(theta)), E = all rows' embeddings, S = the sum
over micro-batches of additive statistics (the mixed model's MLM/MVM sums and counts). So

  1. encode micro-batch j = 1..k without gradient: E_j, S_j;
  2. the loss of the whole batch on the cached E = [E_1..E_k], S = sum S_j, and its gradient
     (dE, dS) w.r.t. them (the contrastive part over N x N: `config.loss.impl` bounds it);
  3. re-encode micro-batch j with its vjp and pull back (dE_j, dS): sum the k parameter
     gradients.

By the chain rule the sum is exactly d loss / d theta of the full batch, while only one
micro-batch's activations are alive at a time (plus the [N, d] embeddings). Micro-batch j is
rows j, j+k, j+2k, ... of the global batch, so with N/devices divisible by k every micro-batch
stays spread over all devices (no data moves).

What is *not* the full batch's:
  - BatchNorm (ConVIRT's ResNet, train mode) normalises each micro-batch with that
    micro-batch's own statistics ("ghost batch norm"); the loss and gradient are exactly those
    of the full batch with that normalisation, not with full-batch statistics. The running
    statistics: the mean of the k micro-batches' updates from the step's starting value, i.e.
    one EMA step per optimizer step with the mean of the micro-batch means and variances. For
    the first BatchNorm (the stem's) that is the full batch's mean exactly and its mean
    within-micro-batch variance (smaller by the spread of the micro-batch means); deeper
    layers' inputs are themselves normalised per micro-batch, so theirs differ more.
  - Dropout draws its masks per micro-batch (key fold_in(step key, j), the same in passes 1
    and 3), so with dropout > 0 the random masks differ from a full-batch step's: the same
    distribution, not the same draw. The mixed model's MLM/MVM masks are drawn once for the
    whole batch with the step's masking key, so they are the full batch's.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from medvl_jax import families
from medvl_jax.errors import ConfigError


def split_rows(tree: Any, k: int) -> Any:
  """[N, ...] leaves -> [k, N/k, ...]: micro-batch j holds rows j, j+k, j+2k, ..."""

  def one(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  return jax.tree.map(one, tree)


def merge_rows(tree: Any) -> Any:
  """Inverse of `split_rows`: [k, N/k, ...] -> [N, ...] in the original row order."""

  def one(x):
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])

  return jax.tree.map(one, tree)


def loss_and_grads(
  params,
  batch_stats,
  batch: dict,
  *,
  model,
  mask: Any,
  rng: jax.Array,
  split: families.Split,
  steps: int,
  loss_fn: Any = None,
):
  """`step.loss_and_grads` of the whole batch, computed in `steps` micro-batches (a drop-in
  for it: `loss_fn` is accepted and unused, the family's `split` stands in for it).

  Returns:
    (loss, metrics, new batch_stats, grads), as `step.loss_and_grads`; frozen params (mask
    False) get zero gradient.
  """
  del loss_fn
  n = next(iter(batch.values())).shape[0]
  if n % steps:
    raise ValueError(f"batch of {n} rows does not split into {steps} micro-batches")

  def variables(p):
    p = jax.tree.map(lambda x, m: x if m else jax.lax.stop_gradient(x), p, mask)
    return {"params": p, "batch_stats": batch_stats}

  prepared = split.prepare(model, variables(params), batch, rng)
  keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(steps))
  xs = (split_rows(batch, steps), split_rows(prepared, steps), keys)

  # 1. Encode every micro-batch, no gradient: the embedding cache and the summed statistics.
  def encode(_, x):
    mb, prep, key = x
    embeds, sums, _ = split.micro(model, variables(params), mb, prep, key)
    return None, (embeds, sums)

  _, (embeds, sums) = jax.lax.scan(encode, None, xs)
  embeds = merge_rows(embeds)
  sums = jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)

  # 2. The whole batch's loss on the cache and its gradient w.r.t. embeddings and sums.
  def combine(e, s):
    return split.combine(model, e[0], e[1], s, batch)

  (loss, metrics), (d_embeds, d_sums) = jax.value_and_grad(combine, argnums=(0, 1), has_aux=True)(
    embeds, sums
  )

  # 3. Re-encode each micro-batch with its vjp and pull its slice of the gradient back.
  def pull_back(carry, x):
    grads, stats = carry
    mb, prep, key, d_e = x

    def encode_one(p):
      embeds_j, sums_j, new_stats = split.micro(model, variables(p), mb, prep, key)
      return (embeds_j, sums_j), new_stats

    _, vjp, new_stats = jax.vjp(encode_one, params, has_aux=True)
    (g,) = vjp((d_e, d_sums))
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, stats, new_stats)), None

  zeros_g = jax.tree.map(jnp.zeros_like, params)
  zeros_s = jax.tree.map(jnp.zeros_like, batch_stats)
  (grads, stats), _ = jax.lax.scan(
    pull_back, (zeros_g, zeros_s), (*xs, split_rows(d_embeds, steps))
  )
  grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
  new_stats = jax.tree.map(lambda s: s / steps, stats)
  return loss, metrics, new_stats, grads


def from_config(family: families.Family, config, mesh=None):
  """A `step.loss_and_grads` replacement for `config.accumulate_steps` > 1, else None."""
  steps = int(config.accumulate_steps)
  if steps == 1:
    return None
  if family.make_split is None:
    raise ConfigError(
      f"config.accumulate_steps={steps}: model family {family.name!r} does not support "
      "accumulation; use 1"
    )
  return functools.partial(loss_and_grads, split=family.make_split(config, mesh), steps=steps)
