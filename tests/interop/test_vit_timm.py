"""The JAX ViT against a real timm VisionTransformer, through the timm name mapping both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax.errors import ConfigError, WeightsError
from medvl_jax.interop import timm_vit
from medvl_jax.models.vit import ViT, ViTConfig, patchify, unpatchify

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

TINY = ViTConfig(
  image_size=32, patch_size=8, in_chans=3, hidden_size=48, num_layers=2, num_heads=3, mlp_ratio=2.0
)


def _timm_model(config):
  name, kwargs = timm_vit.timm_architecture(config)
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False, **kwargs).eval()
  # timm zero-initialises biases and uses tiny position/class values: randomise every tensor
  # so a swapped or transposed weight cannot go unnoticed.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.1)
  return model


def _images(config, n=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, config.image_size, config.image_size, config.in_chans)).astype(
    np.float32
  )


def _timm_tokens(model, x):
  with torch.no_grad():
    return model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def test_timm_to_jax_forward_matches():
  model = _timm_model(TINY)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = timm_vit.from_timm_state_dict(sd, "timm", TINY)
  x = _images(TINY)
  got = ViT(TINY).apply({"params": params}, jnp.asarray(x))
  # float32 on both sides through 2 blocks: 1e-4 absolute.
  np.testing.assert_allclose(np.asarray(got), _timm_tokens(model, x), atol=1e-4, rtol=1e-4)


def test_jax_to_timm_strict_load_and_forward_match():
  params = ViT(TINY).init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
  sd = timm_vit.to_timm_state_dict(params)
  name, kwargs = timm_vit.timm_architecture(TINY)
  model = timm.create_model(name, pretrained=False, **kwargs).eval()
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  x = _images(TINY, seed=1)
  got = np.asarray(ViT(TINY).apply({"params": params}, jnp.asarray(x)))
  np.testing.assert_allclose(got, _timm_tokens(model, x), atol=1e-4, rtol=1e-4)
  # And back: the round trip is exact.
  again = timm_vit.from_timm_state_dict(sd, "rt", TINY)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_patch_mask_equals_dropping_masked_patches():
  """Masked patches hidden as keys = MAE's dropping them: the visible tokens' outputs agree
  with timm run on the visible tokens only."""
  model = _timm_model(TINY)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = timm_vit.from_timm_state_dict(sd, "timm", TINY)
  x = _images(TINY, n=1, seed=2)
  mask = np.zeros((1, TINY.num_patches), bool)
  mask[0, [0, 3, 5, 6, 10, 15]] = True
  got = np.asarray(ViT(TINY).apply({"params": params}, jnp.asarray(x), jnp.asarray(mask)))
  with torch.no_grad():
    t = model.patch_embed(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    t = model._pos_embed(t)  # class token + positions, as forward_features does
    keep = np.concatenate([[True], ~mask[0]])
    t = t[:, torch.from_numpy(keep)]
    want = model.norm(model.blocks(t)).numpy()
  np.testing.assert_allclose(got[:, keep], want, atol=1e-4, rtol=1e-4)


def test_mismatched_checkpoint_is_one_clear_error():
  sd = timm_vit.to_timm_state_dict(
    ViT(TINY).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  )
  del sd["blocks.1.mlp.fc2.bias"]
  with pytest.raises(WeightsError, match="ckpt: .*missing keys .*blocks.1.mlp.fc2.bias"):
    timm_vit.from_timm_state_dict(sd, "ckpt", TINY)
  sd = timm_vit.to_timm_state_dict(
    ViT(TINY).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  )
  bigger = ViTConfig(
    image_size=64, patch_size=8, hidden_size=48, num_layers=2, num_heads=3, mlp_ratio=2.0
  )
  with pytest.raises(WeightsError, match="pos_embed"):
    timm_vit.from_timm_state_dict(sd, "ckpt", bigger)


def test_patch_size_must_divide_image_size():
  with pytest.raises(ConfigError, match="patch_size 12 does not divide image_size 32"):
    ViTConfig(image_size=32, patch_size=12)


def test_patchify_round_trip_and_order():
  x = np.arange(2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1)
  p = np.asarray(patchify(jnp.asarray(x), 4))
  assert p.shape == (2, 4, 16)
  np.testing.assert_array_equal(p[0, 1], x[0, 0:4, 4:8, 0].reshape(-1))  # row-major patches
  np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(p), 4, 1)), x)
