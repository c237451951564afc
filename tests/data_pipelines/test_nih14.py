"""`nih14` on a fixture tree in the NIH ChestX-ray14 layout (real NIH images and labels)."""

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines.nih14 import Builder
from data_pipelines.nih14.nih14_dataset_builder import NIH_LABELS
from medvl_jax.errors import DataError
from tests import fixtures_layout as fl


def build(manual_dir, data_dir, config="default_64"):
  builder = Builder(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
  )
  return builder


@pytest.fixture(scope="module")
def tree(sample_data_dir, tmp_path_factory):
  return fl.nih14(sample_data_dir, tmp_path_factory.mktemp("nih"))


def test_counts_splits_labels(tree, tmp_path):
  builder = build(tree, tmp_path)
  entries = {r["Image Index"]: r for r in fl.read_csv(tree / "Data_Entry_2017_v2020.csv")}
  test_list = set((tree / "test_list.txt").read_text().split())
  splits = {
    s: list(builder.as_dataset(split=s).as_numpy_iterator())
    for s in ("train", "validation", "test")
  }
  assert builder.info.metadata["skipped"] == {}
  assert sum(map(len, splits.values())) == len(entries)
  assert {ex["image_id"].decode() for ex in splits["test"]} == test_list
  patients = {s: {ex["patient_id"] for ex in v} for s, v in splits.items()}
  assert not (
    patients["train"] & patients["validation"]
    or patients["train"] & patients["test"]
    or patients["validation"] & patients["test"]
  )
  positives = 0
  for examples in splits.values():
    for ex in examples:
      row = entries[ex["image_id"].decode()]
      found = set(row["Finding Labels"].split("|"))
      np.testing.assert_array_equal(ex["labels"], [int(l in found) for l in NIH_LABELS])
      positives += int(ex["labels"].sum())
      assert ex["view"].decode() == row["View Position"]
      assert ex["image"].shape == (64, 64, 1) and ex["image"].dtype == np.uint8
  assert positives > 0


def test_bad_input(tree, tmp_path):
  bad = tmp_path / "nih"
  shutil.copytree(tree, bad)
  pngs = sorted(bad.rglob("*.png"))
  pngs[0].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  pngs[1].unlink()
  builder = build(bad, tmp_path / "tfds")
  assert builder.info.metadata["skipped"] == {"unreadable_image": 1, "missing_image": 1}
  (bad / "test_list.txt").unlink()
  with pytest.raises(DataError, match="test_list.txt: required file not found"):
    build(bad, tmp_path / "tfds2")
