"""The batch layout declared once (`medvl_jax.data.batch`): spec, dummy batches, the check."""

import numpy as np
import pytest

from configs import convirt
from medvl_jax import families
from medvl_jax.data import batch
from medvl_jax.errors import DataError

S, L, B = 32, 12, 4


def test_spec_is_the_agreed_layout():
  assert batch.spec(S, L) == {
    "image": ((S, S, 1), np.dtype(np.uint8)),
    "input_ids": ((L,), np.dtype(np.int32)),
    "attention_mask": ((L,), np.dtype(np.int32)),
    "has_image": ((), np.dtype(bool)),
    "has_text": ((), np.dtype(bool)),
    "source": ((), np.dtype(np.int32)),
  }
  ev = batch.spec(S, L, eval=True)
  assert list(ev) == list(batch.spec(S, L)) + ["mask"]
  assert ev["mask"] == ((), np.dtype(bool))
  assert batch.EVAL_ONLY_KEYS == ("mask",)
  assert set(batch.MODEL_INPUTS) < set(batch.TRAIN_KEYS)


@pytest.mark.parametrize("eval_", [False, True])
def test_zeros_follows_the_layout(eval_):
  z = batch.zeros(B, S, L, eval=eval_)
  batch.check(z, image_size=S, max_length=L, batch_size=B, eval=eval_)
  assert list(z) == list(batch.keys(eval_))
  assert not z["image"].any() and not z["input_ids"].any() and not z["source"].any()
  assert z["attention_mask"].all() and z["has_image"].all() and z["has_text"].all()
  if eval_:
    assert z["mask"].all()


def test_from_config_and_families_dummy_batch():
  cfg = convirt.get_config("smoke")
  z = batch.from_config(cfg, 3)
  batch.check(z, image_size=cfg.data.image_size, max_length=cfg.data.max_length, batch_size=3)
  d = families.dummy_batch(cfg)
  batch.check(d, image_size=cfg.data.image_size, max_length=cfg.data.max_length, batch_size=1)


def test_random_is_a_valid_paired_batch():
  r = batch.random(B, S, L, seed=3)
  batch.check(r, image_size=S, max_length=L, batch_size=B)
  assert (r["attention_mask"].sum(1) == L - 1).all()  # L <= 16: the one length left.
  r = batch.random(8, S, 40, seed=3)
  lengths = r["attention_mask"].sum(1)
  assert lengths.min() >= 16 and lengths.max() < 40
  # Attention is a prefix: every row attends to its first `length` positions only.
  assert (r["attention_mask"] == (np.arange(40)[None] < lengths[:, None])).all()
  assert r["input_ids"].min() >= 1000 and r["input_ids"].max() < 28000
  assert r["image"].std() > 50  # Uniform uint8 noise, not zeros.
  np.testing.assert_array_equal(r["image"], batch.random(8, S, 40, seed=3)["image"])
  assert (r["image"] != batch.random(8, S, 40, seed=4)["image"]).any()


def _bad(**changes):
  z = batch.zeros(B, S, L)
  for k, v in changes.items():
    if v is None:
      del z[k]
    else:
      z[k] = v
  return z


@pytest.mark.parametrize(
  "bad,kw,match",
  [
    (_bad(has_text=None), {}, r"batch: missing keys \['has_text'\], unexpected keys \[\]"),
    (_bad(labels=np.zeros((B, 3), np.int32)), {}, r"unexpected keys \['labels'\]"),
    (batch.zeros(B, S, L), {"eval": True}, r"missing keys \['mask'\]"),
    (
      _bad(image=np.zeros((B, S, S, 1), np.float32)),
      {},
      r"'image' has dtype float32; expected uint8",
    ),
    (_bad(has_image=np.ones((B,), np.int32)), {}, r"'has_image' has dtype int32; expected bool"),
    (_bad(input_ids=np.zeros((B, L), np.int64)), {}, r"'input_ids' has dtype int64"),
    (_bad(source=[0] * B), {}, r"'source' has dtype None"),
    (_bad(image=np.zeros((B, S, S), np.uint8)), {}, r"'image' has shape \(4, 32, 32\)"),
    (
      _bad(image=np.zeros((B, S, S - 1, 1), np.uint8)),
      {},
      r"'image' has shape \(4, 32, 31, 1\); expected \(4, 32, 32, 1\)",
    ),
    (batch.zeros(B, S, L), {"image_size": 64}, r"'image' has shape .*expected \(4, 64, 64, 1\)"),
    (
      batch.zeros(B, S, L),
      {"max_length": 16},
      r"'input_ids' has shape \(4, 12\); expected "
      r"\(4, 16\)",
    ),
    (
      batch.zeros(B, S, L),
      {"batch_size": 8},
      r"'image' has shape \(4, 32, 32, 1\); expected "
      r"\(8, 32, 32, 1\)",
    ),
    (_bad(attention_mask=np.ones((B, L + 1), np.int32)), {}, r"'attention_mask' has shape"),
    (_bad(has_text=np.ones((B, 1), bool)), {}, r"'has_text' has shape \(4, 1\); expected \(4,\)"),
    (_bad(source=np.zeros((B + 1,), np.int32)), {}, r"'source' has shape \(5,\)"),
  ],
)
def test_check_rejects_each_bad_case_in_one_line(bad, kw, match):
  with pytest.raises(DataError, match=match) as e:
    batch.check(bad, **kw)
  assert "\n" not in str(e.value)


def test_check_names_where():
  with pytest.raises(DataError, match=r"^host batch 3: 'has_image'"):
    batch.check(_bad(has_image=np.ones((B,), np.float32)), where="host batch 3")
