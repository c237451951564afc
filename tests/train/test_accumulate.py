"""Embedding-cache accumulation (`config.accumulate_steps`) gives the full batch's loss and
gradient: the mixed model exactly; ConVIRT exactly for the normalisation its BatchNorm then
uses (each micro-batch's own statistics), which differs from full-batch BatchNorm.

Tolerance: float32 throughout; the loss to rtol 1e-5, each gradient leaf to 1e-4 of its
largest entry + 1e-8 (summation order differs: k partial sums of the parameter gradient;
leaves whose true gradient is 0, e.g. a bias under a LayerNorm, hold ~1e-12 round-off).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import convirt as convirt_config
from configs import mixed as mixed_config
from medvl_jax import config_check, families
from medvl_jax.errors import ConfigError
from medvl_jax.losses import contrastive
from medvl_jax.train import accumulate, step
from tests.conftest import mixed_args, read_scalars, run_main

K = 2  # micro-batches
N = 8  # rows


def _no_dropout(cfg):
  cfg.model.text.hidden_dropout = 0.0
  cfg.model.text.attention_dropout = 0.0
  if cfg.model.name == "mixed":
    cfg.model.image.dropout = 0.0
    cfg.model.image.attention_dropout = 0.0
    cfg.model.fusion.dropout = 0.0
  return cfg


def _setup(cfg):
  family = families.get(cfg.model.name)
  model = family.build(cfg.model)
  variables = families.init_variables(model, cfg, jax.random.key(0))
  mask = family.trainable_mask(variables["params"], cfg.model)
  return family, model, variables, mask


def _batch(cfg, kinds="pppppppp"):
  rng = np.random.default_rng(0)
  s, length = cfg.data.image_size, cfg.data.max_length
  lengths = rng.integers(4, length, size=N)
  has_image = np.array([k in "pi" for k in kinds])
  has_text = np.array([k in "pt" for k in kinds])
  ids = rng.integers(1000, 30000, size=(N, length)).astype(np.int32)
  att = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids[~has_text] = 0
  att[~has_text] = 0
  return {
    "image": rng.integers(0, 256, size=(N, s, s, 1), dtype=np.uint8),
    "input_ids": ids,
    "attention_mask": att,
    "has_image": has_image,
    "has_text": has_text,
    "source": np.zeros(N, np.int32),
  }


def _accumulated(family, model, variables, mask, batch, cfg, rng):
  fn = functools.partial(
    accumulate.loss_and_grads,
    model=model,
    mask=mask,
    rng=rng,
    split=family.make_split(cfg),
    steps=K,
  )
  return jax.jit(fn)(variables["params"], variables.get("batch_stats", {}), batch)


def _full(family, model, variables, mask, batch, cfg, rng):
  fn = functools.partial(
    step.loss_and_grads, model=model, loss_fn=family.make_loss(cfg), mask=mask, rng=rng
  )
  return jax.jit(fn)(variables["params"], variables.get("batch_stats", {}), batch)


def _assert_grads_close(got, want):
  leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(leaves_got) == len(leaves_want)
  nonzero = 0
  for a, b in zip(leaves_got, leaves_want):
    a, b = np.asarray(a), np.asarray(b)
    scale = float(np.max(np.abs(b)))
    nonzero += scale > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale + 1e-8)
  assert nonzero > len(leaves_want) // 2  # the comparison is not between zeros


@pytest.mark.slow  # ~160 s on the shared 2-core CPU (two compiles of the mixed model)
def test_mixed_accumulation_equals_full_batch():
  """MLM and MVM add up over micro-batches (sums / global counts) and the masks are drawn
  once for the whole batch: loss, every metric and the gradient equal the full batch's."""
  cfg = _no_dropout(mixed_config.get_config("smoke"))
  family, model, variables, mask = _setup(cfg)
  batch = _batch(cfg, kinds="pitppitp")  # paired, image-only, text-only rows
  rng = jax.random.key(3)
  l_acc, m_acc, _, g_acc = _accumulated(family, model, variables, mask, batch, cfg, rng)
  l_full, m_full, _, g_full = _full(family, model, variables, mask, batch, cfg, rng)
  np.testing.assert_allclose(float(l_acc), float(l_full), rtol=1e-5)
  assert set(m_acc) == set(m_full)
  for k in m_full:
    np.testing.assert_allclose(float(m_acc[k]), float(m_full[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(m_full["contrastive"]) > 0 and float(m_full["pairs"]) == 4
  _assert_grads_close(g_acc, g_full)


def _ghost_bn_reference(model, variables, mask, batch, cfg, rng):
  """The full batch's loss when the ResNet normalises each micro-batch (rows j, j+K, ...)
  with its own statistics, differentiated end to end by jax.grad (no embedding cache)."""

  def loss_of(params):
    params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
    image = jnp.zeros((N, cfg.model.projection_dim))
    text = jnp.zeros((N, cfg.model.projection_dim))
    for j in range(K):
      out, _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        batch["image"][j::K],
        batch["input_ids"][j::K],
        batch["attention_mask"][j::K],
        train=True,
        rngs={"dropout": jax.random.fold_in(rng, j)},
        mutable=["batch_stats"],
      )
      image = image.at[j::K].set(out["image_embed"])
      text = text.at[j::K].set(out["text_embed"])
    return contrastive.infonce(image, text, lam=cfg.loss.lam, temperature=cfg.loss.temperature)[0]

  return jax.jit(jax.value_and_grad(loss_of))(variables["params"])


@pytest.mark.slow  # ~30-90 s on 2 cores
def test_convirt_accumulation_is_exact_for_micro_batch_batchnorm():
  cfg = _no_dropout(convirt_config.get_config("smoke"))
  lam = cfg.loss.lam
  assert lam == 0.75
  family, model, variables, mask = _setup(cfg)
  batch = _batch(cfg)
  rng = jax.random.key(3)
  l_acc, m_acc, stats_acc, g_acc = _accumulated(family, model, variables, mask, batch, cfg, rng)
  l_ref, g_ref = _ghost_bn_reference(model, variables, mask, batch, cfg, rng)
  np.testing.assert_allclose(float(l_acc), float(l_ref), rtol=1e-5)
  _assert_grads_close(g_acc, g_ref)
  np.testing.assert_allclose(
    float(l_acc), lam * float(m_acc["loss_i2t"]) + (1 - lam) * float(m_acc["loss_t2i"]), rtol=1e-5
  )
  # What BatchNorm sees: with full-batch statistics the loss is another number ...
  l_full, _, stats_full, _ = _full(family, model, variables, mask, batch, cfg, rng)
  assert abs(float(l_full) - float(l_acc)) > 1e-4, (float(l_full), float(l_acc))
  # ... and the running statistics are the mean of the K micro-batch updates: for the stem's
  # BatchNorm (its input does not depend on an earlier normalisation) the full batch's mean
  # exactly and the mean within-micro-batch variance (not larger than the full batch's);
  # deeper layers see inputs normalised per micro-batch, so theirs differ.
  stem_acc, stem_full = stats_acc["image"]["bn1"], stats_full["image"]["bn1"]
  np.testing.assert_allclose(stem_acc["mean"], stem_full["mean"], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(stem_acc["var"]) <= np.asarray(stem_full["var"]) + 1e-6)
  assert np.any(np.asarray(stem_acc["var"]) < np.asarray(stem_full["var"]) - 1e-6)
  deep_acc = stats_acc["image"]["layer1"]["0"]["bn1"]["mean"]
  assert not np.allclose(deep_acc, stats_full["image"]["layer1"]["0"]["bn1"]["mean"], rtol=1e-6)


def test_config_check_rejects_bad_accumulation_and_impl(tfds_dir):
  cfg = convirt_config.get_config("smoke")
  cfg.data.data_dir = str(tfds_dir)
  cfg.accumulate_steps = 3
  with pytest.raises(ConfigError, match=r"accumulate_steps=3 does not divide .*batch_size=8"):
    config_check.check(cfg)
  cfg.accumulate_steps = 2
  cfg.loss.impl = "sparse"
  with pytest.raises(ConfigError, match=r"config.loss.impl='sparse' is unknown; valid: dense"):
    config_check.check(cfg)


@pytest.mark.slow  # a real CLI run of the mixed smoke model on 8 simulated devices
def test_cli_trains_with_ring_loss_and_accumulation_on_8_devices(
  tfds_dir, sample_data_dir, tmp_path
):
  workdir = tmp_path / "run"
  proc = run_main(
    *mixed_args(
      workdir,
      tfds_dir,
      "--config.batch_size=16",
      "--config.accumulate_steps=2",
      "--config.loss.impl=ring",
      "--config.total_steps=2",
      "--config.eval_every=2",
      "--config.checkpoint_every=2",
    ),
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"},
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh: 8 devices" in proc.stderr + proc.stdout
  scalars = read_scalars(workdir / "tensorboard")
  assert sorted(scalars["train_loss"]) == [1, 2]
  assert all(np.isfinite(v) for v in scalars["train_loss"].values())
  assert scalars["train_contrastive"][1] > 0 and np.isfinite(scalars["val_loss"][2])
