"""tfds builder for the RSNA Pneumonia Detection Challenge (Kaggle, stage 2 training set).

One example per patient (the challenge has one frontal DICOM per patientId). Label: binary,
`labels[0]` = max of `Target` over the patient's rows of `stage_2_train_labels.csv` (1 =
lung opacity suggestive of pneumonia); the opacity boxes (x, y, width, height in pixels of the
original 1024x1024 image) and the `stage_2_detailed_class_info.csv` class ('' for a patient
missing there) are kept; Target outside {0, 1}, or boxes that disagree with it, is
`bad_labels`. The DICOM header (ViewPosition, Rows, Columns) is read while listing records
(~0.2 ms a file); a file that is not a DICOM image is `unreadable_image`. Splits:
the challenge's labelled set only, cut by patient hash into train/validation/test (80/10/10,
`common.split_for_patient`); `stage_2_test_images` has no published labels and is not read.
DICOM decode (pydicom): modality LUT, VOI window when present, 8-bit kept as-is, MONOCHROME1
inverted (`imaging.load_dicom`). View: the DICOM `ViewPosition` (PA/AP).
"""

import collections
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import common, imaging

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGES = "stage_2_train_images"
# The three values of `class` in stage_2_detailed_class_info.csv.
DETAILED_CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")


def _integral(raw: str) -> int:
  """'1', '1.0' -> 1; ValueError for text, fractions, inf and nan."""
  value = float(raw)
  if not value.is_integer():
    raise ValueError(raw)
  return int(value)


class Builder(common.CorpusBuilder):
  """RSNA Pneumonia Detection Challenge: 26,684 labelled frontal DICOMs, binary label."""

  BUILDER_CONFIGS = common.make_configs([("default", "Images, binary label, boxes.", {})])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Accept the rules of https://www.kaggle.com/c/rsna-pneumonia-detection-challenge and download
the data (`kaggle competitions download -c rsna-pneumonia-detection-challenge`); unzip it into
manual_dir, as published:
  <manual_dir>/stage_2_train_labels.csv          (patientId,x,y,width,height,Target)
  <manual_dir>/stage_2_detailed_class_info.csv   (patientId,class)
  <manual_dir>/stage_2_train_images/<patientId>.dcm
(stage_2_test_images/ and stage_2_sample_submission.csv may stay; they are not read.)
"""

  def _features(self) -> dict[str, Any]:
    return {
      "image": common.image_feature(),
      "image_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "view": tfds.features.Text(),
      "labels": common.labels_feature(1),
      "detailed_class": tfds.features.Text(),
      "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
    }

  def _load_task_fn(self):
    return imaging.load_dicom_task

  def _split_records(self, root: epath.Path) -> dict[str, list[dict[str, Any]]]:
    import pydicom  # pylint: disable=g-import-not-at-top

    rows = self.csv(root / LABELS_CSV, ("patientId", "x", "y", "width", "height", "Target"))
    classes = {
      r["patientId"].strip(): r["class"].strip()
      for r in self.csv(root / CLASS_CSV, ("patientId", "class"))
    }
    folder = common.require(root / IMAGES, "DICOM folder")
    by_patient: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    for row in rows:  # Several rows (one per box) for a patient with several opacities.
      by_patient[row["patientId"].strip()].append(row)
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in self.SPLITS}
    for patient, patient_rows in by_patient.items():
      # The key and the file name are the patientId: logs name the CSV line only.
      where = patient_rows[0].where
      if not patient:
        self.skip("bad_labels", where)
        continue
      record: dict[str, Any] = {"_key": patient, "_where": where}
      by_split[common.split_for_patient(patient)].append(record)
      path = common.safe_path(folder, f"{patient}.dcm")
      try:
        targets = [_integral(r["Target"]) for r in patient_rows]
        boxes = [
          [float(r[k]) for k in ("x", "y", "width", "height")]
          for r in patient_rows
          if r["x"].strip()
        ]
      except ValueError:
        record["_skip"] = ("bad_labels", where)
        continue
      if (
        set(targets) - {0, 1}
        or (max(targets) == 1) != bool(boxes)
        or not np.isfinite(np.asarray(boxes, np.float64)).all()
      ):
        record["_skip"] = ("bad_labels", where)
        continue
      if path is None:
        record["_skip"] = ("outside_manual_dir", where)
        continue
      if not path.exists():
        record["_skip"] = ("missing_image", where)
        continue
      try:  # Header only: the pixel data is decoded in the worker processes.
        header = pydicom.dcmread(
          str(path), stop_before_pixels=True, specific_tags=["ViewPosition", "Rows", "Columns"]
        )
        if not header.get("Rows") or not header.get("Columns"):
          raise ValueError("no Rows/Columns: not an image")
      except imaging.dicom_errors() as e:
        record["_skip"] = ("unreadable_image", f"{where}: {type(e).__name__}")
        continue
      view = str(header.get("ViewPosition", "") or "").strip()
      if not view:
        record["_skip"] = ("unknown_view", where)
        continue
      record.update(
        _image=path,
        image_id=f"{patient}.dcm",
        patient_id=patient,
        view=view,
        labels=[max(targets)],
        detailed_class=classes.get(patient, ""),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
      )
    return by_split

  def _example(self, record: dict[str, Any], png: bytes) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")} | {"image": png}
