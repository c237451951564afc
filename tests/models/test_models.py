"""Tests for the ConVIRT model, its ResNet and BERT towers (tiny variants)."""

import functools

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvl_jax import interop
from medvl_jax.errors import ConfigError
from medvl_jax.models import convirt
from medvl_jax.models.bert import BertConfig
from medvl_jax.models.resnet import ResNetTiny

N, L = 3, 10
TINY_BERT = BertConfig(
  vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
)


def tiny_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(
    {
      "dtype": "float32",
      "projection_dim": 16,
      "projection_hidden": 24,
      "image": {
        "variant": "resnet_tiny",
        "init": "",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "conv_impl": "auto",
      },
      "text": {
        "init": "",
        "init_layers": 0,
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
      },
    }
  )
  cfg.update(overrides)
  return cfg


def batch():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, 32, 32, 1), dtype=np.uint8)
  ids = rng.integers(1000, 30000, (N, L)).astype(np.int32)
  mask = np.zeros((N, L), np.int32)
  for i, n in enumerate((10, 4, 2)):  # Real lengths; the rest is padding.
    mask[i, :n] = 1
  ids[mask == 0] = 0
  return images, ids, mask


def random_like(shapes, seed: int = 0):
  """NumPy-random variables shaped like `shapes`.

  Compiling `model.init` on CPU is dominated by one threefry RNG per parameter (seconds for
  the tiny ResNet), so the tests trace init abstractly and fill the leaves here instead.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name == "scale":
      return (1 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    fan_in = np.prod(leaf.shape[:-1]) if name == "kernel" else 1
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def model_and_vars():
  model = convirt.from_config(tiny_cfg())
  images, ids, mask = batch()
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), images, ids, mask
  )
  return model, random_like(shapes)


def test_from_config_builds_and_shapes(model_and_vars):
  model, variables = model_and_vars
  images, ids, mask = batch()
  assert set(variables["params"]) == {"image", "text", "image_proj", "text_proj"}
  assert set(variables["batch_stats"]) == {"image"}
  out = model.apply(variables, images, ids, mask, train=False)
  assert out["image_embed"].shape == (N, 16) and out["text_embed"].shape == (N, 16)
  h_v = model.apply(variables, images, False, method=convirt.ConVIRT.encode_image)
  h_u = model.apply(variables, ids, mask, False, method=convirt.ConVIRT.encode_text)
  assert h_v.shape == (N, 4 * 8 * 8) and h_u.shape == (N, 32)
  # The heads really are g(h): fc2(relu(fc1(h))).
  head = variables["params"]["image_proj"]
  g_v = np.maximum(h_v @ head["fc1"]["kernel"] + head["fc1"]["bias"], 0)
  g_v = g_v @ head["fc2"]["kernel"] + head["fc2"]["bias"]
  np.testing.assert_allclose(out["image_embed"], g_v, rtol=1e-5, atol=1e-5)


def test_from_config_bfloat16_computes_in_bfloat16():
  model = convirt.from_config(tiny_cfg(dtype="bfloat16"))
  images, ids, mask = batch()
  out, variables = jax.eval_shape(
    lambda r: model.init_with_output(r, images, ids, mask, train=False), jax.random.key(0)
  )
  assert out["image_embed"].dtype == jnp.bfloat16
  assert out["text_embed"].dtype == jnp.bfloat16
  leaves = jax.tree_util.tree_leaves(variables)
  assert leaves and all(x.dtype == jnp.float32 for x in leaves)  # Parameters stay float32.


def test_from_config_rejects_unknown_names():
  with pytest.raises(ConfigError, match="resnet50.*resnet_tiny"):
    convirt.from_config(tiny_cfg(image={"variant": "resnet18"}))
  with pytest.raises(ConfigError, match="bfloat16.*float32"):
    convirt.from_config(tiny_cfg(dtype="float16"))


def test_text_max_pooling_ignores_padding(model_and_vars):
  model, variables = model_and_vars
  _, ids, mask = batch()
  hidden = np.asarray(
    model.apply(variables, ids, mask, method=lambda m, i, a: m.text(i, a, train=False))
  )
  pooled = np.asarray(model.apply(variables, ids, mask, False, method=convirt.ConVIRT.encode_text))
  expected = np.stack([hidden[i, mask[i] == 1].max(axis=0) for i in range(N)])
  np.testing.assert_array_equal(pooled, expected)
  # The check is discriminative: padded positions do hold larger values in some features.
  assert (hidden.max(axis=1) > expected)[1:].any(axis=1).all()


def test_text_max_pooling_with_dominant_padding():
  """Padding positions holding the largest values never win the max."""

  class Fixed(nn.Module):
    values: np.ndarray

    def __call__(self, input_ids, attention_mask, train):
      del input_ids, attention_mask, train
      return jnp.asarray(self.values)

  _, ids, mask = batch()
  hidden = np.random.default_rng(1).normal(size=(N, L, 5)).astype(np.float32)
  hidden[mask == 0] = 1e6  # Padding holds the largest values everywhere.
  model = convirt.ConVIRT(ResNetTiny(), Fixed(hidden), 4, 4)
  pooled = model.apply({}, ids, mask, False, method=convirt.ConVIRT.encode_text)
  expected = np.stack([hidden[i, mask[i] == 1].max(axis=0) for i in range(N)])
  np.testing.assert_array_equal(np.asarray(pooled), expected)


def test_encode_image_grayscale_uint8_equals_tiled_float(model_and_vars):
  model, variables = model_and_vars
  images, _, _ = batch()
  encode = jax.jit(lambda v, x: model.apply(v, x, False, method=convirt.ConVIRT.encode_image))
  gray = encode(variables, images)
  rgb = encode(variables, np.tile(images.astype(np.float32), (1, 1, 1, 3)))
  scale = float(np.abs(gray).max())
  assert scale > 0
  np.testing.assert_allclose(gray, rgb, rtol=1e-5, atol=1e-5 * scale)
  # Independent preprocessing in NumPy, fed straight to the image tower.
  x = np.tile(images.astype(np.float32) / 255.0, (1, 1, 1, 3))
  x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  direct = model.apply(variables, x.astype(np.float32), method=lambda m, x: m.image(x, train=False))
  np.testing.assert_allclose(gray, direct, rtol=1e-5, atol=1e-5 * scale)


def test_param_tree_uses_torch_names(model_and_vars):
  _, variables = model_and_vars
  names = set(traverse_util.flatten_dict(variables["params"], sep="/"))
  for name in (
    "image/conv1/kernel",
    "image/bn1/scale",
    "image/layer1/0/conv2/kernel",
    "image/layer1/0/downsample/0/kernel",
    "image/layer1/0/downsample/1/scale",
    "image/layer4/0/bn3/bias",
    "text/embeddings/word_embeddings/embedding",
    "text/embeddings/position_embeddings/embedding",
    "text/embeddings/token_type_embeddings/embedding",
    "text/embeddings/LayerNorm/scale",
    "text/encoder/layer/1/attention/self/query/kernel",
    "text/encoder/layer/1/attention/output/dense/kernel",
    "text/encoder/layer/1/attention/output/LayerNorm/bias",
    "text/encoder/layer/1/intermediate/dense/kernel",
    "text/encoder/layer/1/output/dense/bias",
    "text/encoder/layer/1/output/LayerNorm/scale",
    "image_proj/fc1/kernel",
    "text_proj/fc2/bias",
  ):
    assert name in names, name
  stats = set(traverse_util.flatten_dict(variables["batch_stats"], sep="/"))
  assert {"image/bn1/mean", "image/layer2/0/downsample/1/var"} <= stats


def test_names_equal_torchvision_and_hf(model_and_vars):
  torch = pytest.importorskip("torch", reason="name comparison needs torch")
  tv = pytest.importorskip("torchvision", reason="name comparison needs torchvision")
  transformers = pytest.importorskip("transformers", reason="needs transformers")
  del torch
  _, variables = model_and_vars
  image = interop.to_torch(variables["params"]["image"], variables["batch_stats"]["image"])
  ref = tv.models.resnet.ResNet(tv.models.resnet.Bottleneck, [1, 1, 1, 1]).state_dict()
  ref = {k for k in ref if not k.startswith("fc.") and "num_batches_tracked" not in k}
  assert set(image) == ref
  text = interop.to_torch(variables["params"]["text"])
  hf = transformers.BertModel(
    transformers.BertConfig(**TINY_BERT.to_hf()), add_pooling_layer=False
  ).state_dict()
  hf_shapes = {k: tuple(v.shape) for k, v in hf.items() if not k.endswith("_ids")}
  assert {k: v.shape for k, v in text.items()} == hf_shapes


def test_bert_dropout_only_in_training(model_and_vars):
  model, variables = model_and_vars
  _, ids, mask = batch()

  @functools.partial(jax.jit, static_argnames="train")
  def run(variables, train, rng):
    return model.apply(
      variables, ids, mask, rngs={"dropout": rng}, method=lambda m, i, a: m.text(i, a, train=train)
    )

  a = run(variables, False, jax.random.key(1))
  np.testing.assert_array_equal(a, run(variables, False, jax.random.key(2)))
  assert not np.allclose(a, run(variables, True, jax.random.key(1)))


def test_resnet_train_updates_batch_stats(model_and_vars):
  model, variables = model_and_vars
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  y, updates = jax.jit(
    lambda v: model.apply(v, x, mutable=["batch_stats"], method=lambda m, x: m.image(x, train=True))
  )(variables)
  assert y.shape == (2, 256)
  before = variables["batch_stats"]["image"]["bn1"]["mean"]
  after = updates["batch_stats"]["image"]["bn1"]["mean"]
  assert not np.allclose(before, after)
