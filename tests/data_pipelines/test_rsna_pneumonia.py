"""`rsna_pneumonia` on a fixture tree in the Kaggle stage-2 layout (real DICOM written with
pydicom from real NIH radiographs; 8/12-bit, MONOCHROME1 and 2)."""

import io
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_pipelines import imaging
from data_pipelines.rsna_pneumonia import Builder
from medvl_jax.errors import DataError
from tests import fixtures_layout as fl


def build(manual_dir, data_dir, config="default_64", num_workers=1):
  builder = Builder(config=config, data_dir=str(data_dir))
  builder.num_workers = num_workers
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
  )
  return builder


@pytest.fixture(scope="module")
def tree(sample_data_dir, tmp_path_factory):
  return fl.rsna_pneumonia(sample_data_dir, tmp_path_factory.mktemp("rsna"))


def test_counts_splits_labels_and_dicom_decoding(tree, sample_data_dir, tmp_path):
  builder = build(tree, tmp_path, num_workers=2)  # DICOM decode in worker processes.
  rows = fl.read_csv(tree / "stage_2_train_labels.csv")
  classes = {
    r["patientId"]: r["class"] for r in fl.read_csv(tree / "stage_2_detailed_class_info.csv")
  }
  by_patient: dict[str, list[dict[str, str]]] = {}
  for r in rows:
    by_patient.setdefault(r["patientId"], []).append(r)
  assert builder.info.metadata["skipped"] == {}
  splits = {s: list(builder.as_dataset(split=s).as_numpy_iterator()) for s in builder.info.splits}
  assert set(splits) <= {"train", "validation", "test"} and "train" in splits
  examples = [ex for v in splits.values() for ex in v]
  assert len(examples) == len(by_patient)  # One example per patient, boxes folded in.
  patients = {s: {ex["patient_id"] for ex in v} for s, v in splits.items()}
  for a in patients:
    for b in patients:
      assert a == b or not patients[a] & patients[b]
  nih = fl.nih_rows(sample_data_dir)
  for ex in examples:
    pid = ex["patient_id"].decode()
    patient_rows = by_patient[pid]
    assert ex["image_id"].decode() == f"{pid}.dcm"
    assert ex["labels"].tolist() == [max(int(r["Target"]) for r in patient_rows)]
    expected_boxes = [
      [float(r[k]) for k in ("x", "y", "width", "height")] for r in patient_rows if r["x"]
    ]
    np.testing.assert_allclose(ex["boxes"].reshape(-1, 4).tolist(), expected_boxes)
    assert ex["detailed_class"].decode() == classes[pid]
    assert (ex["detailed_class"].decode() == "Lung Opacity") == bool(ex["labels"][0])
    assert ex["view"].decode() in ("PA", "AP")
    assert ex["image"].shape == (64, 64, 1) and ex["image"].dtype == np.uint8
  assert 0 < sum(int(ex["labels"][0]) for ex in examples) < len(examples)
  # Every DICOM variant (8/12-bit, MONOCHROME1 stored inverted) decodes to the radiograph it
  # was written from: strongly positively correlated with the PNG read directly.
  by_id = {ex["patient_id"].decode(): ex for ex in examples}
  for i, r in enumerate(nih[:4]):
    pid = fl.read_csv(tree / "stage_2_detailed_class_info.csv")[i]["patientId"]
    with Image.open(
      io.BytesIO(imaging.load_png(sample_data_dir / "nih14_sample" / r["image_file"], 64))
    ) as img:
      want = np.asarray(img, np.float64).ravel()
    got = by_id[pid]["image"].astype(np.float64).ravel()
    assert np.corrcoef(want, got)[0, 1] > 0.99, (i, pid)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on the corrupt file.
def test_bad_input(tree, tmp_path):
  bad = tmp_path / "rsna"
  shutil.copytree(tree, bad)
  dcms = sorted((bad / "stage_2_train_images").glob("*.dcm"))
  dcms[0].write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00 garbage")
  dcms[1].unlink()
  truncated = dcms[2].read_bytes()
  dcms[2].write_bytes(truncated[: len(truncated) // 2])  # Header fine, pixel data cut.
  builder = build(bad, tmp_path / "tfds")
  assert builder.info.metadata["skipped"] == {"unreadable_image": 2, "missing_image": 1}
  n = sum(info.num_examples for info in builder.info.splits.values())
  assert n == len(dcms) - 3
  (bad / "stage_2_detailed_class_info.csv").unlink()
  with pytest.raises(DataError, match="stage_2_detailed_class_info.csv: required file"):
    build(bad, tmp_path / "tfds2")
  fl.write_csv(
    bad / "stage_2_train_labels.csv",
    ("patientId", "x", "y", "width", "height"),
    [{"patientId": "a", "x": "", "y": "", "width": "", "height": ""}],
  )
  with pytest.raises(DataError, match="stage_2_train_labels.csv: missing column.*Target"):
    build(bad, tmp_path / "tfds3")
