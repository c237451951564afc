"""The `cxr_sample` tfds builder on the real sample and on a copy with bad records."""

import csv
import io
import logging
import pathlib
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_pipelines import sentences as sentences_lib
from data_pipelines.cxr_sample import Builder, split_for_patient

SPLITS = ("train", "validation", "test")
_BUILT: dict[str, pathlib.Path] = {}


def build(config: str, data_dir: pathlib.Path, manual_dir: pathlib.Path) -> Builder:
  builder = Builder(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
  )
  return builder


def sample_tfds_dir(tmp_path_factory, sample_data_dir: pathlib.Path) -> pathlib.Path:
  """The real sample (all three configs) built once per test session; shared by the test files.

  `paired` is built the way the train job builds it: by `sources.prepare`; the other two with
  their random-access copies, as `python -m data_pipelines.prepare` leaves them.
  """
  if "dir" not in _BUILT:
    import ml_collections  # pylint: disable=g-import-not-at-top

    from medvl_jax.data import records, sources  # pylint: disable=g-import-not-at-top

    data_dir = tmp_path_factory.mktemp("tfds")
    config = ml_collections.ConfigDict(
      {
        "data": {
          "name": "cxr_sample",
          "builder_config": "paired",
          "data_dir": str(data_dir),
          "sample_dir": str(sample_data_dir),
        }
      }
    )
    assert sources.prepare(config).is_prepared()
    records.write_copies(build("text_only", data_dir, sample_data_dir))
    records.write_copies(build("image_only", data_dir, sample_data_dir))
    _BUILT["dir"] = data_dir
  return _BUILT["dir"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, sample_data_dir) -> pathlib.Path:
  return sample_tfds_dir(tmp_path_factory, sample_data_dir)


def _load(data_dir, config, decode_images=True):
  builder = Builder(config=config, data_dir=str(data_dir))
  decoders = None if decode_images or config != "paired" else {"image": tfds.decode.SkipDecoding()}
  return builder, {
    s: list(builder.as_dataset(split=s, decoders=decoders).as_numpy_iterator()) for s in SPLITS
  }


def _csv(path) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def test_paired_counts_features_and_patient_splits(data_dir, sample_data_dir):
  builder, splits = _load(data_dir, "paired", decode_images=False)
  assert builder.info.metadata["skipped"] == {}
  assert sum(len(v) for v in splits.values()) == 297
  assert all(len(v) > 0 for v in splits.values())
  patients = {s: {ex["patient_id"] for ex in v} for s, v in splits.items()}
  assert not (patients["train"] & patients["validation"])
  assert not (patients["train"] & patients["test"])
  assert not (patients["validation"] & patients["test"])
  assert len(set().union(*patients.values())) == 148
  rows = {
    r["image_file"].split("/")[-1]: r
    for r in _csv(sample_data_dir / "covid_cxr_notes" / "pairs.csv")
  }
  for split, examples in splits.items():
    for ex in examples:
      row = rows[ex["image_id"].decode()]
      assert split_for_patient(row["patientid"]) == split
      assert ex["text"].decode() == row["clinical_notes"].strip()
      assert [s.decode() for s in ex["sentences"]] == sentences_lib.split_sentences(
        row["clinical_notes"]
      )
      assert ex["view"].decode() == row["view"].strip()
      assert ex["finding"].decode() == row["finding"]


def test_paired_images_are_the_source_pixels(data_dir, sample_data_dir):
  builder = Builder(config="paired", data_dir=str(data_dir))
  spec = builder.info.features["image"]
  assert spec.shape == (None, None, 1) and spec.np_dtype == np.uint8
  for ex in builder.as_dataset(split="validation").take(3).as_numpy_iterator():
    assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
    source = sample_data_dir / "covid_cxr_notes" / "images" / ex["image_id"].decode()
    np.testing.assert_array_equal(ex["image"][..., 0], np.asarray(Image.open(source)))


def test_text_only_counts_and_features(data_dir, sample_data_dir):
  builder, splits = _load(data_dir, "text_only")
  assert sum(len(v) for v in splits.values()) == 2000
  assert builder.info.features["is_normal"].np_dtype == np.int32
  ids = [{ex["report_id"] for ex in v} for v in splits.values()]
  assert sum(len(i) for i in ids) == len(set().union(*ids)) == 2000
  assert sum(int(ex["is_normal"]) for v in splits.values() for ex in v) == 711
  ex = next(e for e in splits[split_for_patient("4")] if e["report_id"] == b"4")
  assert ex["text"].decode().startswith("There are diffuse bilateral interstitial")
  assert ex["text"].decode().endswith("to document resolution.")
  assert [s[:3] for s in ex["sentences"][-3:]] == [b"1. ", b"2. ", b"3. "]
  assert 0.7 < len(splits["train"]) / 2000 < 0.9


def test_image_only_counts_labels_and_patient_splits(data_dir, sample_data_dir):
  from data_pipelines.cxr_sample.cxr_sample_dataset_builder import NIH_LABELS

  builder, splits = _load(data_dir, "image_only")
  assert builder.info.metadata["skipped"] == {}
  rows = {r["image_index"]: r for r in _csv(sample_data_dir / "nih14_sample" / "labels.csv")}
  assert sum(len(v) for v in splits.values()) == len(rows) == 621
  assert all(len(v) > 0 for v in splits.values())
  patients = {s: {ex["patient_id"] for ex in v} for s, v in splits.items()}
  assert sum(len(p) for p in patients.values()) == len(set().union(*patients.values()))
  for split, examples in splits.items():
    for ex in examples:
      row = rows[ex["image_id"].decode()]
      assert split_for_patient(row["patient_id"]) == split
      assert ex["labels"].tolist() == [int(row[name]) for name in NIH_LABELS]
      assert ex["view"].decode() == row["view_position"]
      assert ex["image"].dtype == np.uint8 and ex["image"].shape[-1] == 1
  ex = splits["validation"][0]
  source = Image.open(sample_data_dir / "nih14_sample" / "images" / ex["image_id"].decode())
  np.testing.assert_array_equal(ex["image"][..., 0], np.asarray(source.convert("L")))
  assert "image" in builder.info.features and "sentences" not in builder.info.features


def _pick(rows, patient_key, bad):
  """One row per split (tfds needs every split non-empty) plus `bad` more train rows."""
  firsts = [next(r for r in rows if split_for_patient(r[patient_key]) == s) for s in SPLITS]
  extra = [r for r in rows if split_for_patient(r[patient_key]) == "train" and r not in firsts][
    :bad
  ]
  return firsts + extra


def _write_csv(path, fields, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


@pytest.fixture()
def bad_sample(tmp_path, sample_data_dir) -> pathlib.Path:
  """A copy of 6 real paired rows (one corrupt PNG, one missing image, one empty note) and 4
  IU reports (one with empty findings and impression)."""
  root = tmp_path / "bad_sample"
  (root / "covid_cxr_notes" / "images").mkdir(parents=True)
  (root / "iu_reports").mkdir()
  src = sample_data_dir / "covid_cxr_notes"
  rows = _pick(_csv(src / "pairs.csv"), "patientid", bad=3)
  for row in rows:
    shutil.copy(src / row["image_file"], root / "covid_cxr_notes" / row["image_file"])
  corrupt = root / "covid_cxr_notes" / rows[3]["image_file"]
  corrupt.write_bytes(corrupt.read_bytes()[:200])  # Truncated PNG.
  (root / "covid_cxr_notes" / rows[4]["image_file"]).unlink()
  rows[5]["clinical_notes"] = "   "
  _write_csv(root / "covid_cxr_notes" / "pairs.csv", list(rows[0]), rows)
  reports = _pick(_csv(sample_data_dir / "iu_reports" / "iu_reports_2000.csv"), "report_id", bad=1)
  reports[3]["findings"] = reports[3]["impression"] = " "
  _write_csv(root / "iu_reports" / "iu_reports_2000.csv", list(reports[0]), reports)
  return root


def test_bad_records_are_skipped_counted_and_logged(bad_sample, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  builder = build("paired", tmp_path / "tfds", bad_sample)
  assert sum(s.num_examples for s in builder.info.splits.values()) == 3
  expected = {"empty_text": 1, "missing_image": 1, "unreadable_image": 1}
  assert builder.info.metadata["skipped"] == expected
  reread = Builder(config="paired", data_dir=str(tmp_path / "tfds"))
  assert reread.info.metadata["skipped"] == expected  # Kept with the dataset.
  summary = [r.getMessage() for r in caplog.records if "skipped 3 rows" in r.getMessage()]
  assert len(summary) == 1
  assert summary[0].endswith("skipped 3 rows: 1 empty_text, 1 missing_image, 1 unreadable_image")
  with open(bad_sample / "covid_cxr_notes" / "pairs.csv", newline="", encoding="utf-8") as f:
    notes = [r["clinical_notes"].strip() for r in csv.DictReader(f)]
  logged = " ".join(r.getMessage() for r in caplog.records)
  assert not any(note and note[:40] in logged for note in notes)  # No note text in logs.

  text_only = build("text_only", tmp_path / "tfds", bad_sample)
  assert sum(s.num_examples for s in text_only.info.splits.values()) == 3
  assert text_only.info.metadata["skipped"] == {"empty_text": 1}


def test_missing_csv_is_a_data_error(tmp_path):
  from medvl_jax.errors import DataError  # pylint: disable=g-import-not-at-top

  with pytest.raises(DataError, match="nowhere"):
    build("paired", tmp_path / "tfds", tmp_path / "nowhere")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "README.md").write_text("not the sample")
  with pytest.raises(DataError, match="covid_cxr_notes/pairs.csv"):
    build("paired", tmp_path / "tfds2", tmp_path / "other")


def test_non_grayscale_png_is_converted(tmp_path):
  from data_pipelines.cxr_sample.cxr_sample_dataset_builder import read_grayscale_png

  rgb = np.zeros((4, 5, 3), np.uint8)
  rgb[..., 0] = 255
  path = tmp_path / "rgb.png"
  Image.fromarray(rgb).save(path)
  gray = Image.open(io.BytesIO(read_grayscale_png(path)))
  assert gray.mode == "L" and gray.size == (5, 4)
  np.testing.assert_array_equal(np.asarray(gray), np.asarray(Image.fromarray(rgb).convert("L")))


# ----------------------------------------------------------------------------- nih_halves
# The rows of each half on the sample, as data_pipelines/cxr_sample/README.md gives them.
HALF_COUNTS = {"pretrain": 311, "probe": 310}


@pytest.mark.parametrize(
  "patient_id,bucket,half,split",
  [
    ("9145", 0, "pretrain", "train"),
    ("100", 28, "pretrain", "train"),
    ("17370", 49, "pretrain", "train"),
    ("1962", 50, "probe", "train"),
    ("75", 73, "probe", "train"),
    ("353", 86, "probe", "validation"),
    ("211", 91, "probe", "test"),
    ("21902", 99, "probe", "test"),
  ],
)
def test_nih_halves_rule_is_fixed(patient_id, bucket, half, split):
  """Sample patients on both sides of the bucket-50 boundary land where the docs say; the
  three-way split of the other configs keeps its buckets."""
  from data_pipelines.common import patient_bucket  # pylint: disable=g-import-not-at-top
  from data_pipelines.cxr_sample.cxr_sample_dataset_builder import NIH_HALVES

  assert patient_bucket(patient_id) == patient_bucket(f" {patient_id}\n") == bucket
  assert split_for_patient(patient_id, NIH_HALVES) == half
  assert split_for_patient(patient_id) == split


@pytest.fixture(scope="module")
def halves_dir(tmp_path_factory, sample_data_dir) -> pathlib.Path:
  """`nih_halves` alone, as `python -m data_pipelines.prepare cxr_sample --config=nih_halves`
  leaves it: the tfds dataset and the random-access copies of `pretrain` and `probe`."""
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path_factory.mktemp("nih_halves")
  prepare.prepare("cxr_sample", str(sample_data_dir), data_dir=str(data_dir), config="nih_halves")
  return data_dir


def _nih_rows(data_dir, config) -> tuple[Builder, dict[str, dict[str, tuple]]]:
  """split -> image_id -> (patient_id, labels, view, PNG bytes as stored)."""
  builder = Builder(config=config, data_dir=str(data_dir))
  out = {}
  for split in builder.info.splits:
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    out[split] = {
      ex["image_id"].decode(): (
        ex["patient_id"].decode(),
        tuple(ex["labels"].tolist()),
        ex["view"].decode(),
        ex["image"],
      )
      for ex in ds.as_numpy_iterator()
    }
  return builder, out


def test_nih_halves_split_image_only_by_patient(data_dir, halves_dir):
  from data_pipelines.cxr_sample.cxr_sample_dataset_builder import NIH_HALVES

  image_only, whole = _nih_rows(data_dir, "image_only")
  builder, halves = _nih_rows(halves_dir, "nih_halves")
  assert list(builder.info.splits) == ["pretrain", "probe"]
  assert builder.info.features.to_json() == image_only.info.features.to_json()
  assert builder.info.metadata["skipped"] == image_only.info.metadata["skipped"] == {}
  # Every image_only row exactly once, unchanged (labels, view, image bytes).
  rows = {k: v for split in whole.values() for k, v in split.items()}
  assert sum(len(h) for h in halves.values()) == len(rows) == 621
  assert {k: v for half in halves.values() for k, v in half.items()} == rows
  assert {s: len(h) for s, h in halves.items()} == HALF_COUNTS
  assert all(0.4 < len(h) / len(rows) < 0.6 for h in halves.values())
  patients = {s: {v[0] for v in h.values()} for s, h in halves.items()}
  assert not patients["pretrain"] & patients["probe"]
  for split, half in halves.items():
    assert all(split_for_patient(v[0], NIH_HALVES) == split for v in half.values())
  # The pretraining half lies inside image_only's train split: its validation and test rows
  # are all in the probe half.
  assert set(halves["pretrain"]) <= set(whole["train"])
  assert set(whole["validation"]) | set(whole["test"]) <= set(halves["probe"])


def test_nih_halves_are_read_by_training_and_the_evaluators(halves_dir):
  from medvl_jax.data import records, sources  # pylint: disable=g-import-not-at-top
  from medvl_jax.evaluate import datasets  # pylint: disable=g-import-not-at-top
  from tests.data.sample import make_config  # pylint: disable=g-import-not-at-top

  builder = Builder(config="nih_halves", data_dir=str(halves_dir))
  assert records.has_copies(builder)
  for split, n in HALF_COUNTS.items():
    assert records.RecordStore.open(builder, split).total == n
  # A train source on the pretraining half: checked and found prepared (nothing is built).
  config = make_config(
    halves_dir,
    **{
      "data.builder_config": "nih_halves",
      "data.train_split": "pretrain",
      "data.eval_split": "probe",
    },
  )
  config.data.sources = (
    {
      "name": "cxr_sample",
      "builder_config": "nih_halves",
      "split": "pretrain",
      "kind": "image",
      "weight": 1.0,
    },
  )
  assert [s.split for s in sources.check_sources(config)] == ["pretrain"]
  assert sources.split_sizes(config, sources.sources(config)) == [HALF_COUNTS["pretrain"]]
  # The probe half through the evaluators' reader.
  probe = datasets.load_split(
    "cxr_sample", "probe", builder_config="nih_halves", data_dir=str(halves_dir), image_size=32
  )
  assert probe["image"].shape == (HALF_COUNTS["probe"], 32, 32, 1)
  assert probe["labels"].shape == (HALF_COUNTS["probe"], 15)
  assert sorted(probe["image_id"]) == sorted(_nih_rows(halves_dir, "nih_halves")[1]["probe"])
