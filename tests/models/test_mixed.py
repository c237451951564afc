"""The mixed-data model under its objective: rows without a modality take no part (value and
gradient), masks from the 'masking' stream, encoders, regeneration, configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mixed as mixed_config
from medvl_jax.data import batch as batch_lib
from medvl_jax.errors import ConfigError
from medvl_jax.families import mixed as mixed_family
from medvl_jax.losses import mixed as mixed_objective
from medvl_jax.models import mixed

SCALES = ("1x1", "2x2", "4x4")


def init(model, key):
  """The model's variables, initialised on a dummy batch of the layout."""
  return mixed.init(model, key, batch_lib.zeros(2, model.vit_config.image_size, 8))


@pytest.fixture(scope="module")
def smoke():
  cfg = mixed_config.get_config("smoke")
  model = mixed.from_config(cfg.model)
  variables = init(model, jax.random.key(0))
  return cfg, model, variables


def _batch(kinds, seed=0, size=64, length=16):
  """kinds: string of 'p' (paired), 'i' (image only), 't' (text only), in the agreed layout."""
  rng = np.random.default_rng(seed)
  b = len(kinds)
  has_image = np.array([k in "pi" for k in kinds])
  has_text = np.array([k in "pt" for k in kinds])
  image = rng.integers(0, 256, size=(b, size, size, 1)).astype(np.uint8)
  image[~has_image] = 0
  ids = rng.integers(1000, 30000, size=(b, length)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 101, 102
  att = np.ones((b, length), np.int32)
  att[:, length - 3 :] = 0
  ids[:, length - 3 :] = 0
  ids[~has_text], att[~has_text] = 0, 0
  return {
    "image": jnp.asarray(image),
    "input_ids": jnp.asarray(ids),
    "attention_mask": jnp.asarray(att),
    "has_image": jnp.asarray(has_image),
    "has_text": jnp.asarray(has_text),
    "source": jnp.zeros((b,), jnp.int32),
  }


def _loss(model, variables, batch, masks, cfg):
  outputs = model.apply(variables, batch, train=False, masks=masks)
  return mixed_objective.loss(outputs, batch, cfg.loss, model.scale_names)


def _draw(model, variables, batch, seed=0):
  return model.apply(
    variables, batch, method=mixed.MixedModel.draw_masks, rngs={"masking": jax.random.key(seed)}
  )


def _take(tree, rows):
  return jax.tree_util.tree_map(lambda x: x[np.asarray(rows)], tree)


@pytest.mark.slow
def test_mixed_batch_equals_weighted_sums_of_its_parts(smoke):
  cfg, model, variables = smoke
  kinds = "pitpitpi"
  batch = _batch(kinds)
  masks = _draw(model, variables, batch)
  _, whole = _loss(model, variables, batch, masks, cfg)
  parts = {}
  for kind in "pit":
    rows = [r for r, k in enumerate(kinds) if k == kind]
    parts[kind] = _loss(model, variables, _take(batch, rows), _take(masks, rows), cfg)[1]
  n_p, n_t = parts["p"]["mlm_tokens"], parts["t"]["mlm_tokens"]
  assert n_p > 0 and n_t > 0
  want_mlm = (n_p * parts["p"]["mlm"] + n_t * parts["t"]["mlm"]) / (n_p + n_t)
  np.testing.assert_allclose(whole["mlm"], want_mlm, rtol=1e-5)
  np.testing.assert_allclose(whole["contrastive"], parts["p"]["contrastive"], rtol=1e-5)
  for name in SCALES:  # per scale: weighted by the masked patches of each part at that scale
    sid = SCALES.index(name)
    counts = {}
    for kind in "pi":
      rows = [r for r, k in enumerate(kinds) if k == kind]
      counts[kind] = float(
        np.sum(np.asarray(masks["patch_mask"])[rows][np.asarray(masks["scale_id"])[rows] == sid])
      )
    if counts["p"] + counts["i"] == 0:
      continue
    want = (counts["p"] * parts["p"][f"mvm_{name}"] + counts["i"] * parts["i"][f"mvm_{name}"]) / (
      counts["p"] + counts["i"]
    )
    np.testing.assert_allclose(whole[f"mvm_{name}"], want, rtol=1e-5)
  assert float(parts["i"]["mlm"]) == 0.0 and float(parts["i"]["contrastive"]) == 0.0
  assert float(parts["t"]["mvm"]) == 0.0 and float(parts["t"]["contrastive"]) == 0.0
  w = cfg.loss
  np.testing.assert_allclose(
    whole["loss"],
    w.mlm_weight * whole["mlm"]
    + w.mvm_weight * whole["mvm"]
    + w.contrastive_weight * whole["contrastive"],
    rtol=1e-6,
  )


def test_missing_modality_contributes_nothing(smoke):
  """Changing the text of a no-text row or the image of a no-image row changes no loss."""
  cfg, model, variables = smoke
  batch = _batch("ptip")
  masks = _draw(model, variables, batch)
  _, base = _loss(model, variables, batch, masks, cfg)
  other = dict(batch)
  ids = np.asarray(batch["input_ids"]).copy()
  ids[2] = np.random.default_rng(5).integers(1000, 30000, size=ids.shape[1])
  other["input_ids"] = jnp.asarray(ids)
  other["attention_mask"] = batch["attention_mask"].at[2].set(1)  # even "visible" tokens
  img = np.asarray(batch["image"]).copy()
  img[1] = 200
  other["image"] = jnp.asarray(img)
  masks2 = dict(masks, mlm_input_ids=masks["mlm_input_ids"].at[2].set(other["input_ids"][2]))
  _, changed = _loss(model, variables, other, masks2, cfg)
  for key in ("loss", "mlm", "mvm", "contrastive", *(f"mvm_{s}" for s in SCALES)):
    assert float(changed[key]) == float(base[key]), key


def test_zero_gradient_through_missing_modality(smoke):
  cfg, model, variables = smoke
  batch = _batch("ptip")
  masks = _draw(model, variables, batch)
  outputs = model.apply(variables, batch, train=False, masks=masks)
  floats = ("mlm_logits", "mvm_pred", "image_embed", "text_embed")

  def total(f):
    return mixed_objective.loss({**outputs, **f}, batch, cfg.loss, model.scale_names)[0]

  grads = jax.grad(total)({k: outputs[k] for k in floats})
  no_text, no_image = 2, 1
  assert not np.any(np.asarray(grads["mlm_logits"][no_text]))
  assert not np.any(np.asarray(grads["text_embed"][no_text]))
  assert not np.any(np.asarray(grads["image_embed"][no_text]))  # unpaired: no contrastive
  assert not np.any(np.asarray(grads["mvm_pred"][no_image]))
  assert not np.any(np.asarray(grads["image_embed"][no_image]))
  assert np.any(np.asarray(grads["mlm_logits"][0])) and np.any(np.asarray(grads["mvm_pred"][0]))


# One kind in the default suite; the text-only and image-only kinds (~40 s of compiles) are slow.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
  "kinds", [pytest.param("tttt", marks=_SLOW), pytest.param("iiii", marks=_SLOW), "pppp"]
)
def test_single_kind_batches_train(smoke, kinds):
  cfg, model, variables = smoke
  batch = _batch(kinds, seed=3)
  rngs = {"masking": jax.random.key(1), "dropout": jax.random.key(2)}

  def fn(p):
    return mixed_family.forward_and_loss(model, {"params": p}, batch, rngs, cfg.loss, True)

  (loss, m), grads = jax.value_and_grad(fn, has_aux=True)(variables["params"])
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
  if kinds == "tttt":
    assert float(m["mvm"]) == 0.0 and float(m["contrastive"]) == 0.0 and float(m["mlm"]) > 0
    assert not np.any(np.asarray(grads["decoder"]["pred"]["kernel"]))
  elif kinds == "iiii":
    assert float(m["mlm"]) == 0.0 and float(m["contrastive"]) == 0.0 and float(m["mvm"]) > 0
    assert not np.any(np.asarray(grads["mlm_head"]["dense"]["kernel"]))
  else:
    assert min(float(m["mlm"]), float(m["mvm"]), float(m["contrastive"])) > 0
    # The MLM decoder is tied: the word embeddings get gradient from the MLM head.
    assert np.any(np.asarray(grads["text"]["embeddings"]["word_embeddings"]["embedding"]))


def test_masks_come_from_the_masking_stream(smoke):
  cfg, model, variables = smoke
  batch = _batch("pppp")
  a = _draw(model, variables, batch, seed=0)
  b = _draw(model, variables, batch, seed=1)
  assert not np.array_equal(np.asarray(a["patch_mask"]), np.asarray(b["patch_mask"]))

  def run(k):
    return mixed_family.forward_and_loss(model, variables, batch, {"masking": k}, cfg.loss, False)[
      0
    ]

  assert float(run(jax.random.key(3))) == float(run(jax.random.key(3)))
  assert float(run(jax.random.key(3))) != float(run(jax.random.key(4)))


def test_encoders_and_regeneration(smoke):
  cfg, model, variables = smoke
  batch = _batch("pp")
  emb = model.apply(variables, batch["image"], method=mixed.MixedModel.embed_image)
  txt = model.apply(
    variables, batch["input_ids"], batch["attention_mask"], method=mixed.MixedModel.embed_text
  )
  assert emb.shape == txt.shape == (2, cfg.model.projection_dim)
  patch_mask = _draw(model, variables, batch)["patch_mask"]
  out = model.apply(variables, batch["image"], patch_mask, method=mixed.MixedModel.regenerate)
  assert out["image"].shape == (2, 64, 64, 1)
  from medvl_jax.models.vit import patchify  # pylint: disable=g-import-not-at-top

  got = np.asarray(patchify(out["image"], 8))
  raw = np.asarray(patchify(batch["image"].astype(jnp.float32), 8))
  keep = ~np.asarray(patch_mask)
  np.testing.assert_allclose(got[keep], raw[keep], atol=1e-3)  # visible patches untouched
  assert np.abs(got[~keep] - raw[~keep]).max() > 1  # masked ones are predicted


@pytest.mark.parametrize("variant", [None, "paired_only", "unpaired", "smoke"])
def test_every_config_variant_builds_the_model(variant):
  cfg = mixed_config.get_config(variant)
  model = mixed.from_config(cfg.model)
  assert cfg.loss.name == "mixed" and cfg.data.sources
  assert all(s["kind"] in ("paired", "image", "text") and s["weight"] > 0 for s in cfg.data.sources)
  assert len(cfg.loss.mvm_scale_weights) == len(cfg.model.masking.image.scales)
  shapes = jax.eval_shape(lambda: init(model, jax.random.key(0)))["params"]
  if variant is None:
    # ViT-B/16 with timm's layout and the bundled MiniLM text stack.
    assert shapes["image"]["pos_embed"].shape == (1, 197, 768)
    assert shapes["text"]["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 384)
  with pytest.raises(ValueError, match="unknown variant"):
    mixed_config.get_config("nope")


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda c: c.model.masking.image.update(ratios=(0.75, 1.0, 0.5)), "outside \\(0, 1\\)"),
    (lambda c: c.model.masking.text.update(prob=0.0), "masking.text.prob: mask ratio 0.0"),
    (lambda c: c.model.image.update(patch_size=12), "patch_size 12 does not divide"),
    (lambda c: c.model.masking.image.update(scales=(1, 2, 16)), "16x16 patches does not fit"),
    (lambda c: c.model.fusion.update(num_heads=5), "model.fusion.num_heads 5"),
  ],
)
def test_bad_config_is_one_clear_error(edit, message):
  cfg = mixed_config.get_config("smoke")
  edit(cfg)
  with pytest.raises(ConfigError, match=message):
    mixed.from_config(cfg.model)


def test_mlm_logits_at_the_first_k_selected_positions_only(smoke):
  """`masking.text.max_predictions` = K: the vocabulary logits of each row's first K selected
  positions, the same as those positions' logits without the gather; with K at least the
  most selected in a row, the MLM loss and accuracy are those of the full computation."""
  cfg, model, variables = smoke
  batch = _batch("pptpttpt", seed=3)
  masks = _draw(model, variables, batch, seed=5)
  weights = np.asarray(masks["mlm_weights"])
  most = int(weights.sum(1).max())
  assert most >= 2 and len(set(weights.sum(1))) > 1
  full = model.apply(variables, batch, train=False, masks=masks)
  for k in (most, most + 3, 1):
    text_mask = dataclasses.replace(model.text_mask, max_predictions=k)
    gathered = model.clone(text_mask=text_mask).apply(variables, batch, train=False, masks=masks)
    assert gathered["mlm_logits"].shape == (8, k, full["mlm_logits"].shape[-1])
    w = np.asarray(gathered["mlm_weights"])
    np.testing.assert_array_equal(w.sum(1), np.minimum(weights.sum(1), k))
    for r in range(8):
      pos = np.flatnonzero(weights[r])[:k]
      np.testing.assert_allclose(
        np.asarray(gathered["mlm_logits"][r, : len(pos)]),
        np.asarray(full["mlm_logits"][r, pos]),
        rtol=0,
        atol=1e-5,
      )
      np.testing.assert_array_equal(
        np.asarray(gathered["mlm_targets"][r, : len(pos)]), np.asarray(batch["input_ids"][r, pos])
      )
    if k >= most:
      _, m_full = mixed_objective.loss(full, batch, cfg.loss, model.scale_names)
      _, m_k = mixed_objective.loss(gathered, batch, cfg.loss, model.scale_names)
      for key in ("mlm", "mlm_acc", "mlm_tokens"):
        np.testing.assert_allclose(float(m_k[key]), float(m_full[key]), rtol=1e-6, err_msg=key)
  with pytest.raises(ConfigError, match="max_predictions=-1"):
    dataclasses.replace(model.text_mask, max_predictions=-1)
