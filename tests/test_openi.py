"""`openi` on a fixture tree in the Open-i layout (real IU report XML text, real images)."""
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines import sentences as sentences_lib
from data_pipelines.openi import Builder
from data_pipelines.openi.openi_dataset_builder import mesh_labels
from tests import fixtures_layout as fl


def build(manual_dir, data_dir):
  builder = Builder(config="paired_64", data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), try_download_gcs=False))
  return builder


@pytest.fixture(scope="module")
def tree(sample_data_dir, tmp_path_factory):
  return fl.openi(sample_data_dir, tmp_path_factory.mktemp("openi"))


def test_mesh_rules_on_real_terms(sample_data_dir):
  reports = fl.iu_reports(sample_data_dir)
  idx = {n: i for i, n in enumerate(common.CHEXPERT_LABELS)}
  counts = np.sum([mesh_labels(r["mesh_major"].split(";")) for r in reports], axis=0)
  assert counts[idx["No Finding"]] == sum(r["is_normal"] == "1" for r in reports)
  for name in ("Cardiomegaly", "Lung Opacity", "Atelectasis", "Pleural Effusion"):
    assert counts[idx[name]] > 10, name
  assert mesh_labels(["Cardiomegaly/borderline", "Pulmonary Artery/enlarged"])[
      idx["Cardiomegaly"]] == 1


def test_counts_text_labels_views(tree, tmp_path, sample_data_dir):
  builder = build(tree, tmp_path)
  iu = {r["report_id"]: r for r in fl.iu_reports(sample_data_dir)}
  splits = {s: list(builder.as_dataset(split=s).as_numpy_iterator())
            for s in builder.info.splits}
  assert builder.info.metadata["skipped"] == {}
  n_images = len(list((tree / "NLMCXR_png").glob("*.png")))
  assert sum(map(len, splits.values())) == n_images
  for split, examples in splits.items():
    for ex in examples:
      row = iu[ex["patient_id"].decode()]
      assert common.split_for_patient(row["report_id"]) == split
      assert ex["findings"].decode() == sentences_lib.normalize(row["findings"])
      assert ex["impression"].decode() == sentences_lib.normalize(row["impression"])
      major = row["mesh_major"].split(";")
      np.testing.assert_array_equal(ex["labels"], mesh_labels(major))
      proj = dict(zip(row["image_ids"].split(";"), row["image_projections"].split(";")))
      assert ex["view"].decode() == proj[ex["image_id"].decode()]
      assert min(ex["image"].shape[:2]) == 64


def test_bad_input(tree, tmp_path):
  bad = tmp_path / "openi"
  shutil.copytree(tree, bad)
  xmls = sorted((bad / "ecgen-radiology").glob("*.xml"))
  text = xmls[0].read_text()
  import re
  n_images = text.count("<parentImage")
  xmls[0].write_text(re.sub(r'(<AbstractText Label="(FINDINGS|IMPRESSION)">)[^<]*', r"\1", text))
  pngs = sorted((bad / "NLMCXR_png").glob("*.png"))
  pngs[-1].write_bytes(b"not a png")
  builder = build(bad, tmp_path / "tfds")
  assert builder.info.metadata["skipped"] == {"empty_text": n_images, "unreadable_image": 1}
