"""Mixed model towers: HF/timm import into the model, export back, PyTorch reproduces the
JAX embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mixed as mixed_config
from medvl_jax.data import batch as batch_lib
from medvl_jax.interop import hf_bert, timm_vit
from medvl_jax.interop import mixed as mixed_interop
from medvl_jax.models import mixed

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _dummy(model):
  return batch_lib.zeros(2, model.vit_config.image_size, 8)


@pytest.fixture(scope="module")
def trained_like():
  """Smoke-sized ViT with the real MiniLM text stack imported; every param perturbed so that
  nothing equals its initialisation."""
  cfg = mixed_config.get_config("smoke")
  cfg.model.text.init = cfg.model.text.tokenizer
  model = mixed.from_config(cfg.model)
  variables = mixed.init(model, jax.random.key(0), _dummy(model))
  variables = mixed_interop.init_from_pretrained(variables, cfg.model)
  _, minilm = hf_bert.load_bert(cfg.model.text.init)
  for a, b in zip(
    jax.tree_util.tree_leaves(variables["params"]["text"]), jax.tree_util.tree_leaves(minilm)
  ):
    np.testing.assert_array_equal(np.asarray(a), b)
  leaves, tree = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return cfg, model, {"params": jax.tree_util.tree_unflatten(tree, leaves)}


def test_exported_towers_reproduce_the_jax_embeddings(trained_like):
  cfg, model, variables = trained_like
  out = mixed_interop.export_state_dicts(model, variables["params"])

  def as_torch(sd):
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}

  heads = as_torch(out["heads"])

  def head(x, side):
    x = torch.relu(x @ heads[f"{side}.fc1.weight"].T + heads[f"{side}.fc1.bias"])
    return x @ heads[f"{side}.fc2.weight"].T + heads[f"{side}.fc2.bias"]

  vit = timm.create_model(
    out["timm"]["architecture"], pretrained=False, **out["timm"]["kwargs"]
  ).eval()
  vit.load_state_dict(as_torch(out["image_encoder"]), strict=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 64, 64, 1), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
  x = (x - 0.5) / 0.5  # configs/mixed.py mean/std
  with torch.no_grad():
    want_img = head(vit(x), "image").numpy()  # timm global_pool='token' = class token
  got_img = model.apply(variables, jnp.asarray(images), method=mixed.MixedModel.embed_image)
  np.testing.assert_allclose(np.asarray(got_img), want_img, atol=1e-4, rtol=1e-4)

  bert = transformers.BertModel(transformers.BertConfig(**out["text_config"])).eval()
  bert.load_state_dict(as_torch(out["text_encoder"]), strict=True)
  tok = transformers.AutoTokenizer.from_pretrained(cfg.model.text.tokenizer)
  enc = tok(
    ["no acute cardiopulmonary process.", "small left pleural effusion"],
    padding="max_length",
    max_length=16,
    return_tensors="np",
  )
  ids, att = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  with torch.no_grad():
    hidden = bert(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(att).long()
    ).last_hidden_state
    hidden = hidden.masked_fill(~torch.from_numpy(att).bool()[..., None], -torch.inf)
    want_txt = head(hidden.amax(1), "text").numpy()  # configs/mixed.py: text.pool = 'max'
  got_txt = model.apply(
    variables, jnp.asarray(ids), jnp.asarray(att), method=mixed.MixedModel.embed_text
  )
  np.testing.assert_allclose(np.asarray(got_txt), want_txt, atol=1e-4, rtol=1e-4)


def test_image_init_from_a_timm_file(tmp_path, trained_like):
  cfg, model, variables = trained_like
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  sd = timm_vit.to_timm_state_dict(variables["params"]["image"])
  sd["head.weight"] = np.zeros((5, 32), np.float32)  # a classifier head is ignored
  path = tmp_path / "vit.safetensors"
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  cfg = cfg.copy_and_resolve_references()
  cfg.model.image.init = str(path)
  fresh = mixed.init(model, jax.random.key(7), _dummy(model))
  loaded = mixed_interop.init_from_pretrained(fresh, cfg.model)
  for a, b in zip(
    jax.tree_util.tree_leaves(loaded["params"]["image"]),
    jax.tree_util.tree_leaves(variables["params"]["image"]),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
