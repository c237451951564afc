"""The model-family contract: the registry, each family's loss names, and ConVIRT through it
computing exactly what the model and the InfoNCE compute when composed by hand (bit-identical:
the contract adds no computation of its own)."""

import jax
import numpy as np
import pytest

from configs import convirt
from configs import mixed as mixed_config
from medvl_jax import config_check, families, losses
from medvl_jax.errors import ConfigError
from medvl_jax.losses import contrastive


def _batch(cfg, n=6, seed=0, **extra):
  rng = np.random.default_rng(seed)
  s, l = cfg.data.image_size, cfg.data.max_length
  lengths = rng.integers(3, l, size=n)
  batch = {
    "image": rng.integers(0, 256, (n, s, s, 1), dtype=np.uint8),
    "input_ids": rng.integers(1000, 30000, (n, l)).astype(np.int32),
    "attention_mask": (np.arange(l)[None] < lengths[:, None]).astype(np.int32),
  }
  batch.update(extra)
  return batch


@pytest.fixture(scope="module")
def smoke():
  cfg = convirt.get_config("smoke")
  family = families.get(cfg.model.name)
  model = family.build(cfg.model)
  variables = jax.jit(lambda r: families.init_variables(model, cfg, r))(jax.random.key(0))
  return cfg, family, model, variables


def test_unknown_family_is_one_config_error():
  with pytest.raises(ConfigError, match=r"config.model.name='nope' is unknown; valid: convirt"):
    families.get("nope")


@pytest.mark.parametrize(
  "config_module, other_loss", [(convirt, "mixed"), (mixed_config, "infonce")]
)
def test_a_family_refuses_the_other_familys_loss(config_module, other_loss):
  """Each family names its own losses: the other family's is one config error, found before
  anything is read or built."""
  cfg = config_module.get_config("smoke")
  cfg.loss.name = other_loss
  with pytest.raises(ConfigError, match=f"config.loss.name='{other_loss}' does not fit"):
    config_check.check(cfg)


def test_convirt_losses_are_registered():
  assert set(families.get("convirt").losses) <= set(losses.LOSSES)


def test_convirt_loss_through_the_family_is_the_hand_composition(smoke):
  cfg, family, model, variables = smoke
  n = 6
  batch = _batch(cfg, n, has_image=np.ones(n, bool), has_text=np.ones(n, bool))
  rng = jax.random.key(3)
  loss, metrics, stats = jax.jit(lambda v, b: family.make_loss(cfg)(model, v, b, rng, True))(
    variables, batch
  )

  def by_hand(v, b):
    out, new = model.apply(
      v,
      b["image"],
      b["input_ids"],
      b["attention_mask"],
      train=True,
      rngs={"dropout": rng},
      mutable=["batch_stats"],
    )
    value, m = contrastive.infonce(
      out["image_embed"],
      out["text_embed"],
      lam=cfg.loss.lam,
      temperature=cfg.loss.temperature,
      mask=b["has_image"] & b["has_text"],
    )
    return value, m, new["batch_stats"]

  ref_loss, ref_metrics, ref_stats = jax.jit(by_hand)(variables, batch)
  np.testing.assert_array_equal(loss, ref_loss)
  assert set(metrics) == set(family.metrics) == set(ref_metrics)
  for k in metrics:
    np.testing.assert_array_equal(metrics[k], ref_metrics[k], err_msg=k)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
    np.testing.assert_array_equal(a, b)


def test_convirt_loss_ignores_unpaired_and_padding_rows(smoke):
  """Rows without a pair (has_image & has_text False) or eval padding (mask False) take no
  part: the loss equals the loss of the batch with those rows removed."""
  cfg, family, model, variables = smoke
  n = 6
  keep = np.array([True, False, True, True, False, True])
  batch = _batch(
    cfg, n, seed=1, has_image=np.ones(n, bool), has_text=keep.copy(), mask=np.ones(n, bool)
  )
  loss_fn = jax.jit(lambda v, b: family.make_loss(cfg)(model, v, b, None, False)[0])
  full = float(loss_fn(variables, batch))
  sub = {k: v[keep] for k, v in batch.items()}
  np.testing.assert_allclose(full, float(loss_fn(variables, sub)), rtol=1e-6)
  padded = dict(batch, has_text=np.ones(n, bool), mask=keep.copy())
  np.testing.assert_allclose(float(loss_fn(variables, padded)), full, rtol=1e-6)


def test_trainable_mask_and_encoders(smoke):
  cfg, family, model, variables = smoke
  mask = family.trainable_mask(variables["params"], cfg.model)
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in p): m
    for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]
  }
  assert not any(m for name, m in flat.items() if name.startswith("text/embeddings/"))
  assert all(m for name, m in flat.items() if name.startswith("image/"))
  batch = _batch(cfg, 3, seed=2)
  h, z = jax.jit(lambda v, x: family.encode_image(model, v, x))(variables, batch["image"])
  zt = jax.jit(lambda v, i, m: family.encode_text(model, v, i, m))(
    variables, batch["input_ids"], batch["attention_mask"]
  )
  out = model.apply(
    variables, batch["image"], batch["input_ids"], batch["attention_mask"], train=False
  )
  np.testing.assert_allclose(z, out["image_embed"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(zt, out["text_embed"], rtol=1e-5, atol=1e-6)
  assert h.shape[0] == 3 and h.ndim == 2
