"""The contrastive loss: ConVIRT's asymmetric bidirectional InfoNCE over the *global* batch.

Every function here is pure and shape-polymorphic; under `jax.jit` with a batch sharded over a
mesh the loss means the same thing on one CPU or a pod: it is always the loss of the whole
global batch. How the N x N similarity is laid out is `config.loss.impl` (`loss`):

  'dense'   `infonce`: one N x N logits matrix; under jit XLA decides where it lives.
  'gather'  each device holds its N/D local rows x the N all-gathered columns, for both
            directions (2 N^2/D floats); gradients flow back through the gather
            (a reduce-scatter). The default.
  'ring'    each device holds N/D x N/D blocks: the columns travel around the batch axes with
            `ppermute`, keeping running log-sum-exps for both directions (2 N^2/D^2 floats);
            the backward pass recomputes each block instead of storing it.

All three are the same function of the embeddings (equal up to float32 summation order,
tests/losses/test_loss_impl.py); 'gather' and 'ring' fall back to 'dense' where the batch is not
split (one device, or no mesh), which is then the identical computation.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from medvl_jax.parallel import sharding

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


# --- Bounded-memory forms over a mesh (config.loss.impl) -----------------------------------
IMPLS = ("dense", "gather", "ring")
DEFAULT_IMPL = "gather"


def _normalised(image_embed, text_embed, mask):
  v = l2_normalize(image_embed.astype(jnp.float32))
  u = l2_normalize(text_embed.astype(jnp.float32))
  return v, u, mask.astype(jnp.float32)


def _finish(l_v2u, l_u2v, ok_v2u, ok_u2v, valid, lam, axes):
  """Global means over the valid rows of the per-row losses / hits held by each device."""
  count = jnp.maximum(jax.lax.psum(jnp.sum(valid), axes), 1.0)

  def mean(x):
    return jax.lax.psum(jnp.sum(jnp.where(valid > 0, x, 0.0)), axes) / count

  loss = mean(lam * l_v2u + (1.0 - lam) * l_u2v)
  metrics = {
    "loss_i2t": mean(l_v2u),
    "loss_t2i": mean(l_u2v),
    "acc_i2t": mean(ok_v2u.astype(jnp.float32)),
    "acc_t2i": mean(ok_u2v.astype(jnp.float32)),
  }
  return loss, metrics


def _gather_local(image_embed, text_embed, mask, *, lam, temperature, axes):
  """Per device: local rows x all-gathered columns, [n, N] per direction."""
  v, u, valid = _normalised(image_embed, text_embed, mask)
  n = v.shape[0]
  v_all = jax.lax.all_gather(v, axes, tiled=True)
  u_all = jax.lax.all_gather(u, axes, tiled=True)
  col_ok = jax.lax.all_gather(valid, axes, tiled=True)[None, :] > 0
  own = jax.lax.axis_index(axes) * n + jnp.arange(n)  # global column of each local row's pair

  def direction(rows, cols):
    logits = jnp.where(col_ok, rows @ cols.T / temperature, _NEG)  # [n, N]
    pos = jnp.take_along_axis(logits, own[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - pos, jnp.argmax(logits, axis=1) == own

  l_v2u, ok_v2u = direction(v, u_all)
  l_u2v, ok_u2v = direction(u, v_all)
  return _finish(l_v2u, l_u2v, ok_v2u, ok_u2v, valid, lam, axes)


def _ring_local(image_embed, text_embed, mask, *, lam, temperature, axes, size):
  """Per device: [n, n] blocks only. The (u, v, valid) column blocks go around the ring;
  each direction keeps a running log-sum-exp and the running max over the negatives."""
  v, u, valid = _normalised(image_embed, text_embed, mask)
  n = v.shape[0]
  me = jax.lax.axis_index(axes)
  rows = jnp.arange(n)
  perm = [(i, (i + 1) % size) for i in range(size)]

  @jax.checkpoint  # backward recomputes the block: nothing [n, n] is stored per step
  def block(u_blk, v_blk, ok_blk, src):
    is_pos = (src == me) & (rows[:, None] == rows[None, :])
    out = []
    for r, c in ((v, u_blk), (u, v_blk)):
      logits = jnp.where(ok_blk[None, :] > 0, r @ c.T / temperature, _NEG)  # [n, n]
      out.append(jax.nn.logsumexp(logits, axis=1))
      out.append(jnp.max(jnp.where(is_pos, -jnp.inf, logits), axis=1))
    return out

  def step(carry, s):
    blocks, stats = carry
    blocks = jax.lax.ppermute(blocks, axes, perm)  # holds device (me - s)'s columns
    new = block(*blocks, (me - s) % size)
    stats = [
      jnp.logaddexp(stats[0], new[0]),
      jnp.maximum(stats[1], new[1]),
      jnp.logaddexp(stats[2], new[2]),
      jnp.maximum(stats[3], new[3]),
    ]
    return (blocks, stats), None

  blocks = (u, v, valid)
  stats = block(*blocks, me)
  (_, stats), _ = jax.lax.scan(step, (blocks, stats), jnp.arange(1, size))
  lse_v2u, neg_v2u, lse_u2v, neg_u2v = stats
  pos = jnp.sum(v * u, axis=1) / temperature  # the diagonal, in both directions
  return _finish(lse_v2u - pos, lse_u2v - pos, pos > neg_v2u, pos > neg_u2v, valid, lam, axes)


def loss(
  image_embed: Array,
  text_embed: Array,
  *,
  lam: float,
  temperature: float,
  mask: Array | None = None,
  impl: str = DEFAULT_IMPL,
  mesh=None,
) -> tuple[Array, dict[str, Array]]:
  """`infonce` of the global batch, laid out as `impl` says (see the module docstring).

  Args:
    image_embed, text_embed, lam, temperature, mask: as `infonce`.
    impl: 'dense' | 'gather' | 'ring'.
    mesh: the Mesh (or AbstractMesh) the batch is sharded over; None = the one set with
      `jax.set_mesh`, if any. The rows are split over its `sharding.batch_split_axes`; without
      a mesh, or with no batch axis of size > 1, every impl is `infonce`.

  Returns:
    (scalar loss, metrics), the same keys as `infonce`.
  """
  if impl not in IMPLS:
    raise ValueError(f"loss impl {impl!r} is unknown; valid: {', '.join(IMPLS)}")
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh is None or mesh.empty else sharding.batch_split_axes(mesh)
  if impl == "dense" or not axes:
    return infonce(image_embed, text_embed, lam=lam, temperature=temperature, mask=mask)
  size = math.prod(mesh.shape[a] for a in axes)
  n = image_embed.shape[0]
  if n % size:
    raise ValueError(f"batch of {n} rows does not split over the {size} devices of {axes}")
  mask = jnp.ones((n,), jnp.bool_) if mask is None else mask
  if impl == "gather":
    local = functools.partial(_gather_local, lam=lam, temperature=temperature, axes=axes)
  else:
    local = functools.partial(_ring_local, lam=lam, temperature=temperature, axes=axes, size=size)
  rows = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows), out_specs=P())(
    image_embed, text_embed, mask
  )


def convirt_loss(outputs: dict[str, Array], cfg, mask: Array | None = None, mesh=None):
  """Loss-registry adapter: model outputs + config.loss -> (loss, metrics)."""
  return loss(
    outputs["image_embed"],
    outputs["text_embed"],
    lam=cfg.lam,
    temperature=cfg.temperature,
    mask=mask,
    impl=cfg.impl,
    mesh=mesh,
  )
