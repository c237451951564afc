"""`chexpert` on a fixture tree in the CheXpert-v1.0-small layout (real images)."""

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines.chexpert import Builder
from medvl_jax.errors import DataError
from tests import fixtures_layout as fl

POLICY = {"u_ignore": -1, "u_ones": 1, "u_zeros": 0}


def build(manual_dir, data_dir, config):
  builder = Builder(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
  )
  return builder


@pytest.fixture(scope="module")
def tree(sample_data_dir, tmp_path_factory):
  return fl.chexpert(sample_data_dir, tmp_path_factory.mktemp("chexpert"))


@pytest.mark.parametrize("policy", ["u_ignore", "u_ones"])
def test_counts_splits_labels_policy(tree, tmp_path, policy):
  builder = build(tree, tmp_path, f"{policy}_64")
  folder = tree / "CheXpert-v1.0-small"
  rows = {r["Path"]: r for name in ("train.csv", "valid.csv") for r in fl.read_csv(folder / name)}
  valid = {r["Path"] for r in fl.read_csv(folder / "valid.csv")}
  splits = {
    s: list(builder.as_dataset(split=s).as_numpy_iterator())
    for s in ("train", "validation", "test")
  }
  assert builder.info.metadata["skipped"] == {}
  assert sum(map(len, splits.values())) == len(rows)
  assert {ex["image_id"].decode() for ex in splits["test"]} == valid
  patients = {s: {ex["patient_id"] for ex in v} for s, v in splits.items()}
  assert not (
    patients["train"] & patients["validation"]
    or patients["train"] & patients["test"]
    or patients["validation"] & patients["test"]
  )
  for examples in splits.values():
    for ex in examples:
      row = rows[ex["image_id"].decode()]
      want = [
        {"1.0": 1, "0.0": 0, "-1.0": POLICY[policy], "": 0}[row[c]] for c in common.CHEXPERT_LABELS
      ]
      np.testing.assert_array_equal(ex["labels"], want)
      assert ex["view"].decode() in ("AP", "PA", "Lateral")
      assert min(ex["image"].shape[:2]) == 64


def test_bad_input(tree, tmp_path):
  bad = tmp_path / "cx"
  shutil.copytree(tree, bad)
  folder = bad / "CheXpert-v1.0-small"
  rows = fl.read_csv(folder / "train.csv")
  jpg = bad / rows[0]["Path"]
  jpg.write_bytes(jpg.read_bytes()[:200])
  rows[1]["Frontal/Lateral"] = ""
  fl.write_csv(folder / "train.csv", fl.CHEXPERT_COLUMNS, rows)
  builder = build(bad, tmp_path / "tfds", "u_zeros_64")
  assert builder.info.metadata["skipped"] == {"unreadable_image": 1, "unknown_view": 1}
  fields = [c for c in fl.CHEXPERT_COLUMNS if c != "Pneumonia"]
  fl.write_csv(folder / "valid.csv", fields, [])
  with pytest.raises(DataError, match=r"valid\.csv: missing column\(s\) Pneumonia"):
    build(bad, tmp_path / "tfds2", "u_zeros_64")
