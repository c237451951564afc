"""bench/corpus_scale.py end to end on a 60-image corpus: the MIMIC-CXR-JPG tree it writes,
prepared by the real command, its last line, reuse of the workdir, and a ConVIRT smoke batch
from the prepared corpus."""

import subprocess
import sys

import pytest

from configs import convirt
from data_pipelines.mimic_cxr.mimic_cxr_dataset_builder import study_dir
from medvl_jax.data import streams
from medvl_jax.data import tokenizer as tokenizer_lib
from tests import fixtures_layout as fl
from tests.conftest import REPO

N = 60
KEYS = {
  "records",
  "hosts",
  "prepare_s",
  "prepare_peak_mib",
  "disk_mib",
  "host_rss_mib",
  "records_per_s",
  "resume_early_s",
  "resume_late_s",
}


def run_scale(workdir, hosts: int) -> tuple[list[str], dict[str, str]]:
  result = subprocess.run(
    [
      sys.executable,
      "bench/corpus_scale.py",
      f"--records={N}",
      f"--hosts={hosts}",
      f"--workdir={workdir}",
      "--image_px=64",
      "--batches=1",
      "--num_workers=1",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  return lines, dict(field.split("=", 1) for field in lines[-1].split())


@pytest.mark.slow  # ~1.5 min: prepare and five fresh input-pipeline processes.
def test_corpus_scale_end_to_end(tmp_path, sample_data_dir):
  lines, fields = run_scale(tmp_path, hosts=2)
  assert KEYS <= set(fields), lines[-1]
  assert (fields["records"], fields["hosts"]) == (str(N), "2")
  # Every synthetic image is a usable record (a view, labels, a report with text).
  assert fields["prepared"] == str(N)
  assert fields["rows_per_host"] == "16"  # configs/convirt.py's batch of 32 over 2 hosts.
  for key in KEYS - {"records", "hosts"}:
    assert float(fields[key]) > 0, key
  assert any(line.startswith("writing images:") for line in lines)

  # The MIMIC-CXR-JPG layout: every metadata row's JPEG and its study's report exist.
  manual = tmp_path / "manual"
  meta = fl.read_csv_gz(manual / "mimic-cxr-2.0.0-metadata.csv.gz")
  split = fl.read_csv_gz(manual / "mimic-cxr-2.0.0-split.csv.gz")
  chexpert = fl.read_csv_gz(manual / "mimic-cxr-2.0.0-chexpert.csv.gz")
  assert len(meta) == len(split) == N
  assert {r["study_id"] for r in chexpert} == {r["study_id"] for r in meta}
  assert int(fields["studies"]) == len(chexpert) < N
  views: dict[str, list[str]] = {}
  for row in meta:
    views.setdefault(row["study_id"], []).append(row["ViewPosition"])
    folder = manual / study_dir(row["subject_id"], row["study_id"])
    assert (folder / f"{row['dicom_id']}.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert "IMPRESSION:" in (folder.parent / f"{folder.name}.txt").read_text()
  # A study: one frontal image, then laterals (MIMIC's PA + LATERAL pairs).
  assert all(v[0] in ("AP", "PA") and set(v[1:]) <= {"LATERAL", "LL"} for v in views.values())
  assert max(len(v) for v in views.values()) > 1

  # Reuse: a rerun measures the host only, with the build's figures.
  again, fields_again = run_scale(tmp_path, hosts=1)
  assert any(line.startswith("reusing the corpus") for line in again)
  assert any(line.startswith("reusing the prepared data") for line in again)
  assert not any(line.startswith(("writing images:", "preparing:")) for line in again)
  assert fields_again["prepare_s"] == fields["prepare_s"]
  assert fields_again["rows_per_host"] == "32"

  # The prepared corpus feeds the ConVIRT smoke model's input.
  config = convirt.get_config("smoke")
  config.data.name, config.data.data_dir = "mimic_cxr", str(tmp_path / "tfds")
  config.data.eval_split = ""  # 60 images: no patient falls in the validation split
  batch = next(streams.create_train_iterator(config, tokenizer_lib.from_config(config)))
  assert batch["image"].shape == (config.batch_size, 64, 64, 1)
  assert batch["image"].std() > 10  # Radiographs, not blank images.
  assert batch["has_image"].all() and batch["has_text"].all()
  assert (batch["attention_mask"].sum(axis=1) > 3).all()  # A sentence, not just [CLS] [SEP].
