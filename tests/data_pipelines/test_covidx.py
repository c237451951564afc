"""`covidx` on a fixture tree in the COVIDx CXR-3 layout (real COVID-19 images of the
covid-chestxray-dataset sample, real NIH images for normal/pneumonia)."""

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines.covidx import Builder
from data_pipelines.covidx.covidx_dataset_builder import CLASSES, parse_line
from medvl_jax.errors import DataError
from tests import fixtures_layout as fl


def build(manual_dir, data_dir, config="default_64"):
  builder = Builder(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
  )
  return builder


def read_lines(path):
  return [l.split() for l in path.read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def tree(sample_data_dir, tmp_path_factory):
  return fl.covidx(sample_data_dir, tmp_path_factory.mktemp("covidx"))


def test_parse_line_formats():
  # CXR-3A / 9A (with source), v1-v5 / 7A / 8A (without), a filename with a space, binary.
  assert parse_line("419639-003251 MIDRC-RICORD-1C-419639-003251-46647-0.png COVID-19 ricord") == (
    "419639-003251",
    "MIDRC-RICORD-1C-419639-003251-46647-0.png",
    "COVID-19",
    "ricord",
  )
  assert parse_line("8 SARS-10.1148rg.242035193-g04mr34g05x-Fig5-day9.jpeg pneumonia") == (
    "8",
    "SARS-10.1148rg.242035193-g04mr34g05x-Fig5-day9.jpeg",
    "pneumonia",
    "",
  )
  assert parse_line("19 covid 19 day 3.jpg COVID-19") == (
    "19",
    "covid 19 day 3.jpg",
    "COVID-19",
    "",
  )
  assert parse_line("a1 a1.png negative rsna") == ("a1", "a1.png", "negative", "rsna")
  assert parse_line("a1 a1.png") is None


def test_counts_splits_labels(tree, tmp_path):
  builder = build(tree, tmp_path)
  train = read_lines(tree / "train_COVIDx_CXR-3A.txt")
  test = read_lines(tree / "test_COVIDx_CXR-3A.txt")
  assert builder.info.metadata["skipped"] == {}
  splits = {
    s: list(builder.as_dataset(split=s).as_numpy_iterator())
    for s in ("train", "validation", "test")
  }
  assert len(splits["train"]) + len(splits["validation"]) == len(train)
  assert len(splits["validation"]) > 0
  # The official test file is the test split, unchanged.
  assert {ex["image_id"].decode() for ex in splits["test"]} == {f"test/{l[1]}" for l in test}
  patients = {s: {ex["patient_id"] for ex in v} for s, v in splits.items()}
  assert not (
    patients["train"] & patients["validation"]
    or patients["train"] & patients["test"]
    or patients["validation"] & patients["test"]
  )
  lines = {f"{part}/{l[1]}": l for part, ls in (("train", train), ("test", test)) for l in ls}
  counts = np.zeros(3, int)
  for examples in splits.values():
    for ex in examples:
      pid, _, cls, source = lines[ex["image_id"].decode()]
      assert ex["patient_id"].decode() == pid and ex["source"].decode() == source
      assert ex["label"] == CLASSES.index(cls)
      np.testing.assert_array_equal(ex["labels"], np.eye(3, dtype=np.int32)[ex["label"]])
      assert ex["view"].decode() == ""
      assert ex["image"].ndim == 3 and min(ex["image"].shape[:2]) == 64
      assert ex["image"].shape[2] == 1 and ex["image"].dtype == np.uint8
      counts += ex["labels"]
  assert (counts > 0).all()  # All three classes occur.
  assert builder.info.features["label"].names == ["normal", "pneumonia", "COVID-19"]


def test_bad_input(tree, tmp_path):
  bad = tmp_path / "covidx"
  shutil.copytree(tree, bad)
  train = read_lines(bad / "train_COVIDx_CXR-3A.txt")
  (bad / "train" / train[0][1]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  (bad / "train" / train[1][1]).unlink()
  with open(bad / "train_COVIDx_CXR-3A.txt", "a") as f:
    f.write("999 extra.png unknown cohen\n")  # A class outside the three.
    f.write(" ".join(train[2]) + "\n")  # The same image listed twice.
  builder = build(bad, tmp_path / "tfds")
  assert builder.info.metadata["skipped"] == {
    "unreadable_image": 1,
    "missing_image": 1,
    "bad_labels": 1,
    "duplicate_key": 1,
  }
  n = sum(info.num_examples for info in builder.info.splits.values())
  assert n == len(train) - 2 + len(read_lines(bad / "test_COVIDx_CXR-3A.txt"))
  # Only the binary Kaggle files: one clear error, not a dataset of skipped records.
  for part in ("train", "test"):
    (bad / f"{part}_COVIDx_CXR-3A.txt").unlink()
  with pytest.raises(DataError, match=r"train.txt: binary COVID-19 positive/negative"):
    build(bad, tmp_path / "tfds2")
  (bad / "train.txt").unlink()
  with pytest.raises(DataError, match=r"train.txt: required file not found"):
    build(bad, tmp_path / "tfds3")
