"""The pure core of training: train state, optimizer, update steps (through a model family).

Nothing here does I/O: `loop.py` wires these into the loop, benchmarks and tests call them
directly. `train_step`/`eval_step` are pure functions of (state, batch) to be jitted with
explicit shardings.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from medvl_jax.ckpt import checkpoint


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(opt_cfg: ml_collections.ConfigDict, mask: Any) -> optax.GradientTransformation:
  """Adam with L2 weight decay (torch.optim.Adam semantics); frozen leaves carry no state."""
  parts = [
    optax.add_decayed_weights(opt_cfg.weight_decay),
    optax.scale_by_adam(),
    optax.scale(-opt_cfg.lr),
  ]
  if opt_cfg.schedule == "plateau":
    parts.append(
      optax.contrib.reduce_on_plateau(
        factor=opt_cfg.plateau_factor,
        patience=opt_cfg.plateau_patience,
        accumulation_size=opt_cfg.plateau_accumulation,
      )
    )
  labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
  return optax.partition({"train": optax.chain(*parts), "frozen": optax.set_to_zero()}, labels)


def loss_and_grads(
  params, batch_stats, batch: dict, *, model, loss_fn: Callable, mask: Any, rng: jax.Array
):
  """Loss of the global batch and its gradient w.r.t. the trainable params (frozen: zeros).

  `loss_fn` is the family's (`families.Family.make_loss(config)`): it sees the whole batch.
  """

  def loss_of(params):
    params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
    loss, metrics, new_stats = loss_fn(
      model, {"params": params, "batch_stats": batch_stats}, batch, rng, True
    )
    return loss, (metrics, new_stats)

  (loss, (metrics, new_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
  return loss, metrics, new_stats, grads


def train_step(
  state: TrainState,
  batch: dict,
  *,
  model,
  tx,
  loss_fn: Callable,
  mask: Any,
  rng: jax.Array,
  accumulate: Callable | None = None,
) -> tuple[TrainState, dict]:
  """One update on the global batch. Frozen params: no gradient, no state, bit-identical.

  `accumulate`: `accumulate.from_config(...)` for `config.accumulate_steps` > 1 (the same
  loss and gradient, computed in micro-batches); None = one pass over the batch.

  Non-finite guard: when the loss, the global gradient norm or any updated parameter is not
  finite, the update is not applied: params, batch statistics and optimizer state come back
  unchanged (bit-identical) and only `step` advances (the batch is consumed). `metrics` then
  has `skipped` = 1 and every other metric 0 (so running means can leave the step out); the
  trainer applies `config.nonfinite` (skip or halt) on the host.
  """
  loss, metrics, batch_stats, grads = (accumulate or loss_and_grads)(
    state.params,
    state.batch_stats,
    batch,
    model=model,
    loss_fn=loss_fn,
    mask=mask,
    rng=jax.random.fold_in(rng, state.step),
  )
  # `value` feeds reduce_on_plateau when configured; other transforms ignore it.
  updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
  params = jax.tree.map(
    lambda p, u, m: (p + u).astype(p.dtype) if m else p, state.params, updates, mask
  )
  grad_norm = optax.tree.norm(grads).astype(jnp.float32)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & checkpoint.all_finite(params)
  keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731  # a select: bit-exact either way
  new_state = state.replace(
    step=state.step + 1,
    params=jax.tree.map(keep, params, state.params),
    batch_stats=jax.tree.map(keep, batch_stats, state.batch_stats),
    opt_state=jax.tree.map(keep, opt_state, state.opt_state),
  )
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
  metrics = {k: jnp.where(ok, v, jnp.zeros_like(v)) for k, v in metrics.items()}
  # The raw values of a skipped step, for the trainer's warning line.
  metrics.update(skipped=(~ok).astype(jnp.float32), raw_loss=loss, raw_grad_norm=grad_norm)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model, loss_fn: Callable) -> dict:
  """Sums over the batch's real rows (`mask`): 'count', 'loss_sum' and '<metric>_sum'."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  loss, metrics, _ = loss_fn(model, variables, batch, None, False)
  n = jnp.sum(batch["mask"].astype(jnp.float32))
  return dict({f"{k}_sum": v * n for k, v in metrics.items()}, loss_sum=loss * n, count=n)


def rngs(config) -> tuple[jax.Array, jax.Array]:
  """(init rng, step rng) derived from config.seed."""
  return tuple(jax.random.split(jax.random.key(config.seed)))
