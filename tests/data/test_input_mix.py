"""Input pipeline v2 on real parts: sources of three kinds, mixing, per-host reads, resume,
shuffle on a 20k-record ArrayRecord store, and the source checks. Reads are counted through a
wrapper around the real random-access store."""

import pathlib

from array_record.python import array_record_module
import numpy as np
import pytest

from medvl_jax.data import input_pipeline as ip
from medvl_jax.data import mixing
from medvl_jax.errors import ConfigError, DataError
from tests.data.test_input_pipeline import TOKENIZER_DIR, make_config, take
from tests.data_pipelines.test_cxr_sample import _csv, sample_tfds_dir

WEIGHTS = {"paired": 2.0, "image": 1.0, "text": 1.0}
SOURCES = (
  {
    "name": "cxr_sample",
    "builder_config": "paired",
    "split": "train",
    "kind": "paired",
    "weight": WEIGHTS["paired"],
  },
  {
    "name": "cxr_sample",
    "builder_config": "image_only",
    "split": "train",
    "kind": "image",
    "weight": WEIGHTS["image"],
    "augment": "mae",
  },
  {
    "name": "cxr_sample",
    "builder_config": "text_only",
    "split": "train",
    "kind": "text",
    "weight": WEIGHTS["text"],
  },
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_data_dir) -> pathlib.Path:
  return sample_tfds_dir(tmp_path_factory, sample_data_dir)


@pytest.fixture(scope="module")
def tokenizer():
  return ip.load_tokenizer(TOKENIZER_DIR)


def mix_config(data_dir, **overrides):
  config = make_config(data_dir, **overrides)
  config.data.sources = SOURCES
  return config


class CountingStore:
  """Counts the records read from a real RecordStore."""

  def __init__(self, store):
    self.store, self.count = store, 0

  def __len__(self):
    return len(self.store)

  def read(self, indices):
    self.count += len(indices)
    return self.store.read(indices)


@pytest.fixture()
def counted(monkeypatch):
  stores = []
  real = ip._open_store

  def wrapped(builder, split):
    stores.append(CountingStore(real(builder, split)))
    return stores[-1]

  monkeypatch.setattr(ip, "_open_store", wrapped)
  return stores


def take_rows(it, batches: int) -> list[tuple]:
  """Rows (raw, source, epoch, position, index) of the next `batches` host batches."""
  out = []
  for _ in range(batches):
    raw, *columns = next(it)
    out += [(r, *(int(v) for v in values)) for r, values in zip(raw, zip(*columns))]
  return out


def records(config, start_step, process_index, process_count, batches):
  """(raw, source, epoch, position, index) of a host's rows of `batches` global batches."""
  readers = ip._readers(config, ip.sources(config))
  plan = mixing.Plan(
    config.seed,
    config.batch_size,
    tuple(len(r.store) for r in readers),
    tuple(r.source.weight for r in readers),
  )
  it = ip.train_records(config, readers, plan, start_step, process_index, process_count)
  return take_rows(it, batches), plan


def test_three_kinds_in_one_batch_layout(data_dir, tokenizer):
  config = mix_config(data_dir)
  batches = take(ip.create_train_iterator(config, tokenizer), 4)
  for batch in batches:
    assert batch.keys() == {
      "image",
      "input_ids",
      "attention_mask",
      "has_image",
      "has_text",
      "source",
    }
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


def test_realised_shares_over_1000_batches():
  # Tolerance: after any number of batches each source is within 1 row of B * b * w / W.
  weights = (5.0, 3.0, 1.5)
  plan = mixing.Plan(seed=0, batch_size=16, sizes=(261, 497, 1597), weights=weights)
  counts = np.zeros(3)
  for b in range(1000):
    sources, _ = plan.rows(b)
    assert len(sources) == 16
    counts += np.bincount(sources, minlength=3)
    np.testing.assert_array_less(np.abs(counts - (b + 1) * 16 * np.array(weights) / 9.5), 1.0)
  np.testing.assert_allclose(counts / counts.sum(), np.array(weights) / 9.5, atol=1e-4)


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
  straight = ip._train_dataset(config, b - 1, 0, 1).skip(1).take(1)
  again = ip._train_dataset(config, b, 0, 1).take(1)
  for x, y in zip(straight.as_numpy_iterator(), again.as_numpy_iterator()):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def store_20k(tmp_path_factory) -> pathlib.Path:
  """A real ArrayRecord file of 20,000 records; record i holds its file position i."""
  path = tmp_path_factory.mktemp("ar") / "fixture.array_record"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for i in range(20_000):
    writer.write(str(i).encode())
  writer.close()
  return path


def test_shuffle_spans_the_file_and_differs_between_epochs(store_20k):
  n, batch = 20_000, 64
  store = CountingStore(ip.RecordStore([str(store_20k)], n))
  source = ip.Source("fixture", "fixture", "", "train", "text", 1.0, "convirt")
  reader = ip._Reader(source, store, None, "", "")
  plan = mixing.Plan(seed=3, batch_size=batch, sizes=(n,), weights=(1.0,))
  it = ip.train_records(None, [reader], plan, 0, 0, 1)
  steps = 2 * n // batch  # 625 batches: two epochs.
  rows = take_rows(it, steps)
  positions = np.array([int(r[0]) for r in rows])
  np.testing.assert_array_equal(positions, [r[4] for r in rows])  # Read what was asked.
  epochs = positions[:n], positions[n : 2 * n]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))  # Full permutations.
  # Statistic: spread of file positions within a batch, (max - min) / N. A random batch of
  # 64 spans ~0.97 N; a window shuffle of block K spans <= K / N (the landed 10k: 0.5).
  spread = [np.ptp(positions[i : i + batch]) / n for i in range(0, len(positions), batch)]
  assert min(spread) > 0.8 and np.median(spread) > 0.95
  assert np.mean(epochs[0] == epochs[1]) < 0.01  # The order differs between epochs.
  # Consecutive batches are not local either: their mean positions are uncorrelated.
  means = np.array([positions[i : i + batch].mean() for i in range(0, n, batch)])
  assert abs(np.corrcoef(means[:-1], means[1:])[0, 1]) < 0.2
  # Resume at step 10,000 (epoch 32 of this store) reads one batch of records.
  store.count = 0
  resumed = ip.train_records(None, [reader], plan, 10_000, 0, 1)
  first = take_rows(resumed, 1)
  assert store.count == batch
  assert [r[2] for r in first] == [10_000 * batch // n] * batch


def test_source_checks_one_line_each(data_dir):
  def check(**entry):
    config = make_config(data_dir)
    config.data.sources = (dict(SOURCES[0], **entry),)
    ip.check_sources(config)

  with pytest.raises(ConfigError, match=r"sources\[0\].name='mimic' is not a known dataset"):
    check(name="mimic")
  with pytest.raises(ConfigError, match=r"sources\[0\].weight=0.0 must be > 0"):
    check(weight=0.0)
  with pytest.raises(
    ConfigError,
    match=r"sources\[0\]: kind 'text' cannot be served by "
    r"cxr_sample/image_only .* it serves: image",
  ):
    check(builder_config="image_only", kind="text")
  with pytest.raises(ConfigError, match=r"sources\[0\].kind='audio' is unknown"):
    check(kind="audio")
  with pytest.raises(ConfigError, match=r"sources\[0\]: split 'valid' not in"):
    check(split="valid")
  with pytest.raises(ConfigError, match=r"sources\[0\].augment='heavy' is unknown"):
    check(augment="heavy")
  with pytest.raises(ConfigError, match=r"each source needs >= 1 row per batch"):
    config = mix_config(data_dir)
    config.data.sources = (SOURCES[0], dict(SOURCES[2], weight=0.01))
    ip.check_sources(config)
  # An empty split (tfds writes no empty split; an empty slice of one is the same case).
  with pytest.raises(
    DataError,
    match=r"sources\[0\]: split 'train\[:0\]' of "
    r"cxr_sample/paired is empty",
  ):
    check(split="train[:0]")
  # A slice is read as such: 'train[:10]' is the first 10 records of train, in file order.
  config = make_config(data_dir)
  config.data.sources = (dict(SOURCES[0], split="train[5:15]"),)
  (reader,) = ip._readers(config, ip.sources(config))
  (whole,) = ip._readers(make_config(data_dir), ip.sources(make_config(data_dir)))
  assert len(reader.store) == 10 and reader.store.read([0, 9]) == whole.store.read([5, 14])


def test_report_text_mode_reads_the_whole_report(data_dir, sample_data_dir):
  config = mix_config(data_dir, **{"data.text_mode": "report", "data.max_length": 128})
  config.data.sources = (SOURCES[2],)
  ds = ip._train_dataset(config, 0, 0, 1)
  batch = next(ds.as_numpy_iterator())
  texts = [t.decode() for t in batch["text"]]
  reports = {
    r["report_id"]: " ".join(t for t in (r["findings"].strip(), r["impression"].strip()) if t)
    for r in _csv(sample_data_dir / "iu_reports" / "iu_reports_2000.csv")
  }
  assert all(t in reports.values() for t in texts)
  assert (batch["image"] == 0).all() and not batch["has_image"].any()
