"""MLM and multi-scale image masks: ratios, randomness, excluded tokens, bad config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax.errors import ConfigError
from medvl_jax.losses import masking

SPECIAL = (0, 100, 101, 102, 103)  # MiniLM [PAD] [UNK] [CLS] [SEP] [MASK]
TEXT = masking.TextMaskConfig(
  prob=0.15,
  mask_frac=0.8,
  random_frac=0.1,
  mask_token_id=103,
  special_token_ids=SPECIAL,
  vocab_size=30522,
)
IMAGE = masking.ImageMaskConfig(grid=14, scales=(1, 2, 4), ratios=(0.75, 0.6, 0.5))


def _text_batch(b=64, length=48, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 30000, size=(b, length))
  lengths = rng.integers(3, length + 1, size=b)
  mask = np.arange(length)[None] < lengths[:, None]
  ids[:, 0] = 101
  ids[np.arange(b), lengths - 1] = 102
  ids[:, 5] = 100  # an [UNK] inside the text
  ids[~mask] = 0
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def test_mlm_rates_and_exclusions():
  ids, att = _text_batch()
  has_text = jnp.ones(ids.shape[0], bool)
  draw = jax.jit(lambda k: masking.mlm_mask(k, ids, att, has_text, TEXT))
  ids_np, att_np = np.asarray(ids), np.asarray(att) > 0
  candidate = att_np & ~np.isin(ids_np, SPECIAL)
  sel_total = to_mask = to_rand = kept = 0
  for step in range(50):
    out = {k: np.asarray(v) for k, v in draw(jax.random.key(step)).items()}
    w = out["weights"]
    assert not np.any(w & ~candidate), "special or padding token selected"
    np.testing.assert_array_equal(out["targets"], ids_np)
    np.testing.assert_array_equal(out["input_ids"][~w], ids_np[~w])  # untouched elsewhere
    sel_total += w.sum()
    to_mask += (w & (out["input_ids"] == 103)).sum()
    kept += (w & (out["input_ids"] == ids_np)).sum()
    to_rand += (w & (out["input_ids"] != 103) & (out["input_ids"] != ids_np)).sum()
  n = candidate.sum() * 50
  # ~ 7e4 candidate draws: binomial sd of the rate ~ 0.0014; 0.01 is > 5 sd.
  assert abs(sel_total / n - 0.15) < 0.01
  # ~ 1e4 selected: sd <= 0.005; 0.02 is 4 sd.
  assert abs(to_mask / sel_total - 0.8) < 0.02
  assert abs(to_rand / sel_total - 0.1) < 0.02
  assert abs(kept / sel_total - 0.1) < 0.02


def test_mlm_rows_without_text_have_no_targets():
  ids, att = _text_batch(b=8)
  has_text = jnp.array([True, False] * 4)
  out = masking.mlm_mask(jax.random.key(0), ids, att, has_text, TEXT)
  assert not np.any(np.asarray(out["weights"])[1::2])
  assert np.any(np.asarray(out["weights"])[0::2])


@pytest.mark.parametrize("k", range(3))
def test_block_mask_ratio_and_block_shape(k):
  block, ratio = IMAGE.scales[k], IMAGE.ratios[k]
  draw = jax.jit(lambda key: masking.block_mask(key, 32, 14, block, ratio))
  masks = np.concatenate([np.asarray(draw(jax.random.key(s))) for s in range(20)])
  # Realised over 640 draws; edge blocks of a 4x4 tiling of 14 are cropped, hence 0.03.
  assert abs(masks.mean() - ratio) < 0.03, (block, masks.mean())
  # Block structure: constant within each block-aligned square.
  grid = masks.reshape(-1, 14, 14)
  for i in range(0, 14, block):
    for j in range(0, 14, block):
      sq = grid[:, i : i + block, j : j + block].reshape(len(grid), -1)
      assert np.all(sq == sq[:, :1])
  # Differs across examples and steps.
  assert len({m.tobytes() for m in masks}) > 600


def test_multiscale_mask_balances_scales_and_varies():
  m1, s1 = masking.multiscale_mask(jax.random.key(0), 12, IMAGE)
  m2, _ = masking.multiscale_mask(jax.random.key(1), 12, IMAGE)
  assert np.bincount(np.asarray(s1), minlength=3).tolist() == [4, 4, 4]
  assert not np.array_equal(np.asarray(m1), np.asarray(m2))
  m1 = np.asarray(m1)
  for i, sid in enumerate(np.asarray(s1)):
    nb = -(-14 // IMAGE.scales[sid])
    # Whole blocks masked: the count equals a sum of (cropped) block areas.
    assert 0 < m1[i].sum() < 196
    assert round(IMAGE.ratios[sid] * nb * nb) > 0


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_image_ratio_outside_open_interval(ratio):
  with pytest.raises(ConfigError, match=f"mask ratio {ratio} is outside"):
    masking.ImageMaskConfig(grid=14, scales=(1, 2), ratios=(0.5, ratio))


def test_text_ratio_outside_open_interval():
  with pytest.raises(ConfigError, match="model.masking.text.prob: mask ratio 1.0 is outside"):
    masking.TextMaskConfig(
      prob=1.0,
      mask_frac=0.8,
      random_frac=0.1,
      mask_token_id=103,
      special_token_ids=SPECIAL,
      vocab_size=10,
    )


def test_scale_larger_than_grid():
  with pytest.raises(ConfigError, match="block 8x8 patches does not fit the 4x4 patch grid"):
    masking.ImageMaskConfig(grid=4, scales=(1, 8), ratios=(0.5, 0.5))


def test_config_token_ids_match_the_minilm_tokenizer():
  transformers = pytest.importorskip("transformers")
  from configs import mixed as mixed_config  # pylint: disable=g-import-not-at-top

  c = mixed_config.get_config()
  tok = transformers.AutoTokenizer.from_pretrained(c.model.text.init)
  assert c.model.masking.text.mask_token_id == tok.mask_token_id
  assert set(c.model.masking.text.special_token_ids) == set(tok.all_special_ids)
