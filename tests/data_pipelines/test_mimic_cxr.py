"""`mimic_cxr`: report section parsing on real IU text, and the builder on a fixture tree in
the MIMIC-CXR-JPG + mimic-cxr-reports layout (real images and report text)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines import sentences as sentences_lib
from data_pipelines.mimic_cxr import Builder
from medvl_jax.errors import DataError
from tests import fixtures_layout as fl

SPLITS = ("train", "validation", "test")


def build(manual_dir, data_dir, config="paired_64") -> Builder:
  builder = Builder(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
  )
  return builder


def load(builder):
  return {s: list(builder.as_dataset(split=s).as_numpy_iterator()) for s in SPLITS}


def test_sections_match_real_iu_reports(sample_data_dir):
  reports = fl.iu_reports(sample_data_dir)
  assert len(reports) == 2000
  for iu in reports:
    findings, impression, text = common.report_fields(fl.mimic_report(iu))
    assert findings == sentences_lib.normalize(iu["findings"]), iu["report_id"]
    assert impression == sentences_lib.normalize(iu["impression"]), iu["report_id"]
    assert text == f"{findings} {impression}"


def test_report_without_findings_still_yields_text(sample_data_dir):
  iu = fl.iu_reports(sample_data_dir)[3]
  findings, impression, text = common.report_fields(fl.mimic_report(iu, findings=False))
  assert findings == "" and text == impression == sentences_lib.normalize(iu["impression"])
  # No headers at all (older MIMIC reports): the text itself, not the request context.
  bare = f"                    FINAL REPORT\n INDICATION: {iu['indication']}\n\n {iu['findings']}\n"
  findings, impression, text = common.report_fields(bare)
  assert (findings, impression) == ("", "")
  assert text == sentences_lib.normalize(iu["findings"])
  assert common.report_fields("   \n FINAL REPORT\n")[2] == ""


@pytest.fixture(scope="module")
def tree(sample_data_dir, tmp_path_factory):
  return fl.mimic_cxr(sample_data_dir, tmp_path_factory.mktemp("mimic"))


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
  builder = build(tree, tmp_path_factory.mktemp("tfds"))
  return builder, load(builder)


def test_counts_splits_labels_sections(tree, built):
  builder, splits = built
  meta = fl.read_csv_gz(tree / "mimic-cxr-2.0.0-metadata.csv.gz")
  official = {
    r["dicom_id"]: r["split"] for r in fl.read_csv_gz(tree / "mimic-cxr-2.0.0-split.csv.gz")
  }
  labels = {r["study_id"]: r for r in fl.read_csv_gz(tree / "mimic-cxr-2.0.0-chexpert.csv.gz")}
  assert builder.info.metadata["skipped"] == {}
  assert sum(map(len, splits.values())) == len(meta)
  assert all(splits[s] for s in SPLITS)
  patients = {s: {ex["patient_id"] for ex in v} for s, v in splits.items()}
  assert not (
    patients["train"] & patients["validation"]
    or patients["train"] & patients["test"]
    or patients["validation"] & patients["test"]
  )
  for split, examples in splits.items():
    for ex in examples:
      image_id = ex["image_id"].decode()
      assert {"validate": "validation"}.get(official[image_id], official[image_id]) == split
      study = ex["study_id"].decode()
      report = (
        tree
        / "files"
        / f"p{ex['patient_id'].decode()[:2]}"
        / f"p{ex['patient_id'].decode()}"
        / f"s{study}.txt"
      ).read_text()
      findings, impression, text = common.report_fields(report)
      assert ex["findings"].decode() == findings and findings
      assert ex["impression"].decode() == impression and impression
      assert ex["text"].decode() == text
      assert [s.decode() for s in ex["sentences"]] == sentences_lib.split_sentences(text)
      want = [
        {"1.0": 1, "0.0": 0, "-1.0": -1, "": 0}[labels[study][c]] for c in common.CHEXPERT_LABELS
      ]
      np.testing.assert_array_equal(ex["labels"], want)
      assert ex["view"].decode() in ("PA", "AP", "LATERAL")
      assert ex["image"].dtype == np.uint8 and ex["image"].shape[2] == 1
      assert min(ex["image"].shape[:2]) == 64


def test_uncertain_policy_ones(tree, tmp_path):
  builder = build(tree, tmp_path, config="paired_u_ones_64")
  ex = next(iter(builder.as_dataset(split="train").as_numpy_iterator()))
  assert set(np.unique(ex["labels"])) <= {0, 1}


def test_bad_records_skipped_and_counted(tree, tmp_path):
  bad = tmp_path / "mimic"
  import shutil

  shutil.copytree(tree, bad)
  meta = fl.read_csv_gz(bad / "mimic-cxr-2.0.0-metadata.csv.gz")
  by_study: dict[str, list[dict[str, str]]] = {}
  for r in meta:
    by_study.setdefault(r["study_id"], []).append(r)
  studies = sorted(by_study)

  def folder(r):
    return bad / "files" / f"p{r['subject_id'][:2]}" / f"p{r['subject_id']}"

  # 1 corrupt image (truncated JPEG), 1 study without report, 1 with an empty report,
  # 1 image with no ViewPosition.
  first = by_study[studies[0]][0]
  jpg = folder(first) / f"s{first['study_id']}" / f"{first['dicom_id']}.jpg"
  jpg.write_bytes(jpg.read_bytes()[:300])
  r = by_study[studies[1]][0]
  (folder(r) / f"s{r['study_id']}.txt").unlink()
  r = by_study[studies[2]][0]
  (folder(r) / f"s{r['study_id']}.txt").write_text("   FINAL REPORT\n FINDINGS:\n\n IMPRESSION:\n")
  by_study[studies[3]][0]["ViewPosition"] = ""
  fl.write_csv(bad / "mimic-cxr-2.0.0-metadata.csv.gz", list(meta[0]), meta, gz=True)
  builder = build(bad, tmp_path / "tfds")
  expected = {
    "unreadable_image": 1,
    "missing_report": len(by_study[studies[1]]),
    "empty_text": len(by_study[studies[2]]),
    "unknown_view": 1,
  }
  assert builder.info.metadata["skipped"] == expected
  total = sum(v.num_examples for v in builder.info.splits.values())
  assert total == len(meta) - sum(expected.values())


def test_missing_file_or_column_is_one_clear_error(tree, tmp_path):
  import shutil

  bad = tmp_path / "mimic"
  shutil.copytree(tree, bad)
  rows = fl.read_csv_gz(bad / "mimic-cxr-2.0.0-chexpert.csv.gz")
  fields = [c for c in rows[0] if c != "Edema"]
  fl.write_csv(
    bad / "mimic-cxr-2.0.0-chexpert.csv.gz",
    fields,
    [{k: r[k] for k in fields} for r in rows],
    gz=True,
  )
  with pytest.raises(DataError, match=r"chexpert\.csv\.gz: missing column\(s\) Edema"):
    build(bad, tmp_path / "tfds")
  (bad / "mimic-cxr-2.0.0-split.csv.gz").unlink()
  with pytest.raises(DataError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz: required file"):
    build(bad, tmp_path / "tfds2")
