"""The train and eval streams on the real sample: the batch layout, determinism, resume, hosts,
sources of three kinds, per-host reads and the eval pass. Reads are counted through a wrapper
around the real random-access store."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from medvl_jax.data import augment, mixing, sources, streams
from medvl_jax.errors import ConfigError
from tests.data.sample import (
  KEYS,
  N_TRAIN,
  N_VALIDATION,
  SOURCES,
  CountingStore,
  assert_same,
  make_config,
  mix_config,
  take,
  take_rows,
)
from tests.data_pipelines.test_cxr_sample import _csv


@pytest.fixture(scope="module")
def fresh(data_dir, tokenizer) -> list[dict[str, np.ndarray]]:
  """Global batches 0..70 (B=8) of a fresh iterator: 2+ epochs of the 261 train examples."""
  return take(streams.create_train_iterator(make_config(data_dir), tokenizer), 71)


@pytest.fixture()
def counted(monkeypatch):
  stores = []
  real = streams._open_store

  def wrapped(builder, split):
    stores.append(CountingStore(real(builder, split)))
    return stores[-1]

  monkeypatch.setattr(streams, "_open_store", wrapped)
  return stores


def records(config, start_step, process_index, process_count, batches):
  """(raw, source, epoch, position, index) of a host's rows of `batches` global batches."""
  readers = streams.open_readers(config, sources.sources(config))
  plan = mixing.Plan(
    config.seed,
    config.batch_size,
    tuple(len(r.store) for r in readers),
    tuple(r.source.weight for r in readers),
  )
  it = streams.train_records(config, readers, plan, start_step, process_index, process_count)
  return take_rows(it, batches), plan


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
  again = take(streams.create_train_iterator(make_config(data_dir), tokenizer), 3)
  for a, b in zip(fresh[:3], again):
    assert_same(a, b)
  other = take(streams.create_train_iterator(make_config(data_dir, seed=1), tokenizer), 3)
  for a, b in zip(fresh[:3], other):
    assert not np.array_equal(a["image"], b["image"])
  assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(fresh, other))


@pytest.mark.parametrize("start_step", [1, 32, 65, 70])
def test_resume_equals_the_fresh_iterator(data_dir, tokenizer, fresh, start_step):
  # Batch 32 holds examples 256..263: the end of epoch 0 and the start of epoch 1;
  # batch 65 (520..527) crosses into epoch 2.
  resumed = streams.create_train_iterator(make_config(data_dir), tokenizer, start_step=start_step)
  for k, batch in enumerate(take(resumed, min(2, 71 - start_step))):
    assert_same(batch, fresh[start_step + k])


def test_hosts_split_each_global_batch(data_dir, tokenizer, fresh):
  hosts = [
    take(
      streams.create_train_iterator(
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
    streams.create_train_iterator(make_config(data_dir), tokenizer, process_count=3)
  with pytest.raises(ConfigError, match="process_index"):
    streams.create_train_iterator(
      make_config(data_dir), tokenizer, process_index=2, process_count=2
    )


def _split_sentences(data_dir, split) -> list[list[str]]:
  builder = sources.prepare(make_config(data_dir))
  ds = builder.as_dataset(
    split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
  )
  return [[s.decode() for s in ex["sentences"]] for ex in ds.as_numpy_iterator()]


def test_epochs_are_permutations_and_one_sentence_is_sampled(data_dir):
  config = make_config(data_dir, batch_size=29)  # 261 = 9 * 29: 9 batches per epoch.
  sources.prepare(config)
  ds = streams.train_dataset(config, 0, 0, 1)
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


def test_three_kinds_in_one_batch_layout(data_dir, tokenizer):
  config = mix_config(data_dir)
  batches = take(streams.create_train_iterator(config, tokenizer), 4)
  for batch in batches:
    assert batch.keys() == KEYS
    source = batch["source"]
    assert batch["has_image"].tolist() == (source != 2).tolist()
    assert batch["has_text"].tolist() == (source != 1).tolist()
    # Rows per source: B * w / W = 4, 2, 2 exactly (largest remainder of integral quotas).
    assert np.bincount(source, minlength=3).tolist() == [4, 2, 2]
    text_rows, image_rows = source == 2, source == 1
    assert (batch["image"][text_rows] == 0).all()  # Text-only: zero image.
    assert (batch["attention_mask"][image_rows] == 0).all()  # Image-only: no tokens.
    assert (batch["input_ids"][image_rows] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"][~image_rows].sum(1).min() >= 3
    assert all(batch["image"][i].std() > 5 for i in np.flatnonzero(~text_rows))
  # Rows are shuffled within the batch (not source by source) and the pattern varies.
  assert len({tuple(b["source"]) for b in batches}) > 1


def test_each_host_reads_a_quarter_of_the_records(data_dir, counted):
  config = mix_config(data_dir)
  one, _ = records(config, 0, 0, 1, batches=25)
  total_one = sum(s.count for s in counted)
  assert total_one == 25 * 8
  counted.clear()
  hosts = [records(config, 0, p, 4, batches=25)[0] for p in range(4)]
  per_host = [sum(s.count for s in counted[3 * p : 3 * p + 3]) for p in range(4)]
  assert per_host == [total_one // 4] * 4  # <= 1/4 + eps, with eps = 0.
  # The hosts' rows put together are the one-process global batches, record for record.
  for b in range(25):
    joined = [row for h in hosts for row in h[2 * b : 2 * b + 2]]
    assert [r[1:] for r in joined] == [r[1:] for r in one[8 * b : 8 * b + 8]]
    assert [r[0] for r in joined] == [r[0] for r in one[8 * b : 8 * b + 8]]


def _first_new_epoch(plan, source, upto):
  """The first batch holding an example of the source's epoch 1."""
  for b in range(upto):
    if (plan.counts_before(b + 1)[source] - 1) // plan.sizes[source] >= 1:
      return b
  raise AssertionError("no epoch boundary")


def test_resume_reads_one_batch_and_continues_the_stream(data_dir, counted):
  # Weights 1:2:5 (1, 2, 5 rows per batch) so every source wraps around within 330 batches.
  config = mix_config(data_dir)
  config.data.sources = tuple(dict(s, weight=w) for s, w in zip(SOURCES, (1.0, 2.0, 5.0)))
  fresh, plan = records(config, 0, 0, 1, batches=330)
  boundaries = [_first_new_epoch(plan, s, 330) - 1 for s in range(3)]
  assert len(set(boundaries)) == 3
  for b in boundaries:  # Resume one batch before the source's first epoch-1 example.
    counted.clear()
    resumed, _ = records(config, b, 0, 1, batches=2)
    assert sum(s.count for s in counted) == 2 * 8  # O(B): the rows of the batches read.
    assert resumed == fresh[8 * b : 8 * b + 16]
    assert {r[2] for r in resumed} >= {0, 1}
  # The full pipeline (decode, augment, tokenise) after resume equals the uninterrupted one.
  b = boundaries[0]
  straight = streams.train_dataset(config, b - 1, 0, 1).skip(1).take(1)
  again = streams.train_dataset(config, b, 0, 1).take(1)
  for x, y in zip(straight.as_numpy_iterator(), again.as_numpy_iterator()):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_report_text_mode_reads_the_whole_report(data_dir, sample_data_dir):
  config = mix_config(data_dir, **{"data.text_mode": "report", "data.max_length": 128})
  config.data.sources = (SOURCES[2],)
  ds = streams.train_dataset(config, 0, 0, 1)
  batch = next(ds.as_numpy_iterator())
  texts = [t.decode() for t in batch["text"]]
  reports = {
    r["report_id"]: " ".join(t for t in (r["findings"].strip(), r["impression"].strip()) if t)
    for r in _csv(sample_data_dir / "iu_reports" / "iu_reports_2000.csv")
  }
  assert all(t in reports.values() for t in texts)
  assert (batch["image"] == 0).all() and not batch["has_image"].any()


def test_eval_pads_masks_and_covers_each_example_once(data_dir, tokenizer):
  config = make_config(data_dir)
  builder = sources.prepare(config)
  single = list(streams.eval_dataset(config, "validation", 0, 1).as_numpy_iterator())
  assert [int(b["mask"].sum()) for b in single] == [8, 8, 5]
  index = np.concatenate([b["index"] for b in single])
  mask = np.concatenate([b["mask"] for b in single])
  assert index[mask].tolist() == list(range(N_VALIDATION))
  assert (single[-1]["image"][5:] == 0).all()
  assert (single[-1]["has_text"] == single[-1]["mask"]).all()
  hosts = [
    list(streams.eval_dataset(config, "validation", i, 2).as_numpy_iterator()) for i in range(2)
  ]
  assert len(hosts[0]) == len(hosts[1]) == 3
  seen = [i for h in hosts for b in h for i in b["index"][b["mask"]]]
  assert sorted(seen) == list(range(N_VALIDATION))
  # Centre crop of the stored image, nothing random.
  first = next(builder.as_dataset(split="validation").take(1).as_numpy_iterator())
  expected = augment.to_uint8(augment.center_crop(first["image"], 32, 37)).numpy()
  np.testing.assert_array_equal(single[0]["image"][0], expected)
  # Public iterator: the train keys plus the mask, same on every pass.
  passes = [list(streams.create_eval_iterator(config, tokenizer, "validation")) for _ in range(2)]
  assert len(passes[0]) == 3 and passes[0][0].keys() == KEYS | {"mask"}
  assert passes[0][0]["mask"].dtype == bool
  for a, b in zip(*passes):
    assert_same(a, b)
