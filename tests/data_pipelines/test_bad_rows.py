"""Bad rows in the data a builder reads: one line or a counted skip, and nothing private logged.

Each case is built for real (tfds `download_and_prepare` into a temporary data dir) from a copy
of a builder's tiny fixture tree with the bad rows added. Every log record at DEBUG and up,
stdout and stderr are captured and searched for the fixture's sentences and patient ids (the
ids are replaced by distinctive strings, since the sample's own are short numbers).

Decisions (docs/RELIABILITY.md): a file-level problem (missing column, a byte that is not
UTF-8, a broken gzip/CSV) is a DataError, one line naming the file and line, because every row
after it is suspect; a row-level problem (duplicate key, unreadable or missing image, a path
that resolves outside manual_dir, a short or long row) is skipped and counted by reason.
"""

import csv
import io
import logging
import os
import pathlib
import shutil

from absl import logging as absl_logging
import pytest
import tensorflow_datasets as tfds

from data_pipelines import common, prepare
from data_pipelines.cxr_sample import Builder as SampleBuilder
from data_pipelines.mimic_cxr import Builder as MimicBuilder
from medvl_jax.data import corpora
from medvl_jax.errors import DataError
from tests import fixtures_layout as fl

DUMMY = SampleBuilder.code_path.parent / "dummy_data"
PAIRS = "covid_cxr_notes/pairs.csv"
IU = "iu_reports/iu_reports_2000.csv"


def read_rows(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    return list(reader.fieldnames or []), list(reader)


def write_rows(path: pathlib.Path, fields, rows) -> None:
  out = io.StringIO(newline="")
  writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  path.write_bytes(out.getvalue().encode("utf-8"))


def distinctive_id(original: str, n: int) -> str:
  """A patient id no log could print by chance, in the same split as `original`."""
  split = common.split_for_patient(original)
  k = 0
  while common.split_for_patient(f"PID-QZX{n:02d}{k:04d}") != split:
    k += 1
  return f"PID-QZX{n:02d}{k:04d}"


@pytest.fixture
def sample(tmp_path) -> pathlib.Path:
  """The cxr_sample dummy tree with distinctive patient ids (same splits)."""
  root = tmp_path / "sample"
  shutil.copytree(DUMMY, root)
  fields, rows = read_rows(root / PAIRS)
  for n, row in enumerate(rows):
    row["patientid"] = distinctive_id(row["patientid"], n)
  write_rows(root / PAIRS, fields, rows)
  return root


@pytest.fixture
def logs(caplog, capfd):
  """Everything the build says: log records at every level, stdout, stderr."""
  absl_logger = logging.getLogger("absl")
  old, old_verbosity = absl_logger.level, absl_logging.get_verbosity()
  absl_logger.setLevel(logging.DEBUG)
  absl_logging.set_verbosity(absl_logging.DEBUG)
  caplog.set_level(logging.DEBUG)

  def text() -> str:
    out, err = capfd.readouterr()
    records = "\n".join(f"{r.levelname} {r.getMessage()}" for r in caplog.records)
    return "\n".join((records, out, err))

  yield text
  # Verbosity first: set_verbosity sets the absl logger's level, which must end as it was
  # (NOTSET when no test set it; otherwise later tests' INFO records are dropped).
  absl_logging.set_verbosity(old_verbosity)
  absl_logger.setLevel(old)


def build(builder_cls, config: str, manual_dir: pathlib.Path, data_dir: pathlib.Path):
  b = builder_cls(config=config, data_dir=str(data_dir))
  b.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
  )
  return b


def private_strings(rows, text_columns, id_columns) -> list[str]:
  """The sentences (>= 12 characters) and patient ids of `rows`: what must never be logged."""
  from data_pipelines import sentences  # pylint: disable=g-import-not-at-top

  found = set()
  for row in rows:
    for col in text_columns:
      found.update(s for s in sentences.split_sentences(row[col]) if len(s) >= 12)
    for col in id_columns:
      if row[col].strip():
        found.add(row[col].strip())
  return sorted(found)


def assert_nothing_private(said: str, private: list[str]) -> None:
  leaked = [p for p in private if p in said]
  assert not leaked, f"logged: {leaked[:3]}"


# ----------------------------------------------------------------------------- file-level errors


def test_missing_column_is_one_line_naming_file_and_column(sample, tmp_path):
  fields, rows = read_rows(sample / PAIRS)
  fields.remove("view")
  for row in rows:
    del row["view"]
  write_rows(sample / PAIRS, fields, rows)
  with pytest.raises(DataError, match=r"pairs\.csv: missing column\(s\) view \(has ") as e:
    build(SampleBuilder, "paired", sample, tmp_path / "tfds")
  assert len(str(e.value).splitlines()) == 1


def test_non_utf8_byte_is_one_line_naming_file_and_line(sample, tmp_path, logs):
  data = (sample / PAIRS).read_bytes().splitlines(keepends=True)
  data[1] = data[1].replace(b"Person", b"Pers\xe9n")  # Latin-1, as a mis-saved note would be.
  (sample / PAIRS).write_bytes(b"".join(data))
  with pytest.raises(DataError) as e:
    build(SampleBuilder, "paired", sample, tmp_path / "tfds")
  assert str(e.value).endswith(
    "pairs.csv: line 2: byte 0xe9 is not UTF-8; re-save the file as UTF-8"
  )
  _, rows = read_rows(DUMMY / PAIRS)
  assert_nothing_private(logs() + str(e.value), private_strings(rows, ["clinical_notes"], []))


def test_non_utf8_and_broken_gzip_in_a_mimic_csv(sample_data_dir, tmp_path):
  """Gzip CSVs (MIMIC-CXR) go through the same reader: the line is counted in the
  decompressed text."""
  root = fl.mimic_cxr(sample_data_dir, tmp_path / "mimic", n_patients=2)
  meta = root / "mimic-cxr-2.0.0-metadata.csv.gz"
  import gzip  # pylint: disable=g-import-not-at-top

  meta.write_bytes(
    gzip.compress(gzip.decompress(meta.read_bytes()).replace(b"Erect", b"\xffrect", 1))
  )
  with pytest.raises(DataError, match=r"metadata\.csv\.gz: line 2: byte 0xff is not UTF-8"):
    build(MimicBuilder, "paired_64", root, tmp_path / "tfds")
  meta.write_bytes(b"\x1f\x8b not gzip")
  with pytest.raises(DataError, match=r"metadata\.csv\.gz: not a readable gzip file"):
    build(MimicBuilder, "paired_64", root, tmp_path / "tfds")


# ----------------------------------------------------------------------------- row-level skips


def test_bad_rows_are_skipped_counted_and_never_logged_with_text_or_patient_id(
  sample, tmp_path, logs
):
  fields, rows = read_rows(sample / PAIRS)
  good = [r for r in rows if (sample / "covid_cxr_notes" / r["image_file"]).exists()]
  outside = tmp_path / "outside.png"
  shutil.copy(sample / "covid_cxr_notes" / good[0]["image_file"], outside)
  (sample / "covid_cxr_notes" / "images" / "link.png").symlink_to(outside)
  (sample / "covid_cxr_notes" / "images" / "broken.png").write_bytes(
    b"\x89PNG\r\n\x1a\n" + b"0" * 40
  )
  extra = [
    dict(good[0]),  # The same image twice: tfds would stop, logging both examples.
    dict(good[1], image_file="images/broken.png"),  # Not a decodable image.
    dict(good[2], image_file="../../outside.png"),  # `..` out of manual_dir.
    dict(good[3], image_file="images/link.png"),  # A symlink out of manual_dir.
  ]
  write_rows(sample / PAIRS, fields, rows + extra)
  with open(sample / PAIRS, "a", encoding="utf-8") as f:  # A row cut short (2 cells).
    f.write(f"images/x.png,{good[0]['patientid']}\n")
  b = build(SampleBuilder, "paired", sample, tmp_path / "tfds")
  assert dict(b.info.metadata["skipped"]) == {
    "duplicate_key": 1,
    "missing_image": 1,  # The dummy tree's own bad row.
    "unreadable_image": 1,
    "outside_manual_dir": 2,
    "malformed_row": 1,
  }
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {
    "train": 3,
    "validation": 1,
    "test": 1,
  }
  said = logs()
  assert "skipped 6 rows: 2 outside_manual_dir, " in said
  for line in ("pairs.csv:8 (image", "pairs.csv:9 (image", "pairs.csv:10 (image", "pairs.csv:12"):
    assert line in said
  assert "Two examples share the same hashed key" not in said
  assert_nothing_private(said, private_strings(rows, ["clinical_notes"], ["patientid"]))


def test_text_only_duplicate_report_and_bad_label_are_counted(tmp_path, logs):
  root = tmp_path / "sample"
  shutil.copytree(DUMMY, root)
  fields, rows = read_rows(root / IU)
  write_rows(root / IU, fields, rows + [dict(rows[0]), dict(rows[1], is_normal="yes")])
  b = build(SampleBuilder, "text_only", root, tmp_path / "tfds")
  assert dict(b.info.metadata["skipped"]) == {
    "duplicate_key": 1,
    "bad_labels": 1,
    "empty_text": 1,
  }
  assert_nothing_private(logs(), private_strings(rows, ["findings", "impression"], []))


def test_mimic_duplicate_and_outside_rows(sample_data_dir, tmp_path, logs):
  root = fl.mimic_cxr(sample_data_dir, tmp_path / "mimic", n_patients=3)
  meta_path = root / "mimic-cxr-2.0.0-metadata.csv.gz"
  meta = fl.read_csv_gz(meta_path)
  # A study folder that is a symlink to a copy outside manual_dir.
  victim = next(r for r in meta if r["study_id"] != meta[0]["study_id"])
  folder = root / "files" / f"p{victim['subject_id'][:2]}" / f"p{victim['subject_id']}"
  study = folder / f"s{victim['study_id']}"
  outside = tmp_path / "elsewhere"
  shutil.copytree(study, outside)
  shutil.rmtree(study)
  study.symlink_to(outside)
  fl.write_csv(meta_path, list(meta[0]), meta + [dict(meta[0])], gz=True)
  b = build(MimicBuilder, "paired_64", root, tmp_path / "tfds")
  n_victims = sum(r["study_id"] == victim["study_id"] for r in meta)
  assert dict(b.info.metadata["skipped"]) == {
    "duplicate_key": 1,
    "outside_manual_dir": n_victims,
  }
  reports = [p.read_text() for p in root.rglob("*.txt")]
  private = [r["subject_id"] for r in meta]
  from data_pipelines import sentences  # pylint: disable=g-import-not-at-top

  for report in reports:
    private += [
      s for s in sentences.split_sentences(common.report_fields(report)[2]) if len(s) >= 12
    ]
  assert_nothing_private(logs(), private)


# ----------------------------------------------------------------------------- changed source


def test_changed_source_is_noticed_and_rebuild_clears_it(sample, tmp_path, caplog):
  data_dir = tmp_path / "tfds"
  prepare.prepare("cxr_sample", str(sample), data_dir=str(data_dir), config="paired")
  source = corpora.builder("cxr_sample", "paired", str(data_dir)).info.metadata["source"]
  assert source["manual_dir"] == os.path.realpath(sample)
  assert set(source["files"]) == {PAIRS}
  caplog.set_level(logging.WARNING)

  def warnings() -> list[str]:
    corpora._WARNED.clear()  # pylint: disable=protected-access
    caplog.clear()
    corpora.builder("cxr_sample", "paired", str(data_dir))
    return [r.getMessage() for r in caplog.records if "changed since" in r.getMessage()]

  assert warnings() == []
  # Same bytes, new mtime (a copy, a `touch`): hashed, found equal, not reported.
  os.utime(sample / PAIRS, ns=(1, 1))
  assert warnings() == []
  fields, rows = read_rows(sample / PAIRS)
  rows[0]["finding"] = "Edited"
  write_rows(sample / PAIRS, fields, rows)
  (said,) = warnings()
  assert f"{PAIRS} (changed)" in said
  assert "python -m data_pipelines.prepare cxr_sample --config=paired" in said
  assert said.endswith("--rebuild`") and "\n" not in said
  prepare.prepare("cxr_sample", str(sample), data_dir=str(data_dir), config="paired", rebuild=True)
  assert warnings() == []


def test_prepare_cli_bad_file_is_one_error_line_exit_2(sample, tmp_path):
  """The real CLI: `error: <file>: line N: ...`, exit 2, no traceback, no note text."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top

  data = (sample / PAIRS).read_bytes().splitlines(keepends=True)
  data[1] = data[1].replace(b"Person", b"Pers\xe9n")
  (sample / PAIRS).write_bytes(b"".join(data))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "data_pipelines.prepare",
      "cxr_sample",
      "--config=paired",
      f"--manual_dir={sample}",
      f"--data_dir={tmp_path / 'tfds'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert errors == [
    f"error: {sample / PAIRS}: line 2: byte 0xe9 is not UTF-8; re-save the file as UTF-8"
  ]
  _, rows = read_rows(DUMMY / PAIRS)
  assert_nothing_private(proc.stdout + proc.stderr, private_strings(rows, ["clinical_notes"], []))
