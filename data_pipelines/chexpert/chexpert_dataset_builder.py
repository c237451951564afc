"""tfds builder for CheXpert (full `CheXpert-v1.0` or `CheXpert-v1.0-small`).

One example per image. Splits: the official `valid.csv` (radiologist-labelled) is `test`;
`train.csv` is cut by patient hash into `train` (80%) and `validation` (20%). Labels: the 14
CheXpert observations with the config's policy for uncertain (-1) labels: `u_ignore` keeps -1
(mask it in the loss), `u_ones` maps it to 1, `u_zeros` to 0; blank is 0.
"""

import re
from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from data_pipelines import common

FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
_PATIENT = re.compile(r"/(patient\d+)/")


class Builder(common.CorpusBuilder):
  """CheXpert: 224,316 radiographs of 65,240 patients, 14 labels."""

  BUILDER_CONFIGS = common.make_configs(
    [
      ("u_ignore", "Uncertain labels kept as -1.", {"uncertain": "ignore"}),
      ("u_ones", "Uncertain labels as 1 (U-Ones).", {"uncertain": "ones"}),
      ("u_zeros", "Uncertain labels as 0 (U-Zeros).", {"uncertain": "zeros"}),
    ]
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Register at https://stanfordmlgroup.github.io/competitions/chexpert/ and unzip the download
into manual_dir, so that the CSV `Path` column (e.g.
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg) is relative to manual_dir:
  <manual_dir>/CheXpert-v1.0-small/train.csv   (Path, Sex, Age, Frontal/Lateral, AP/PA,
  <manual_dir>/CheXpert-v1.0-small/valid.csv    No Finding ... Support Devices)
  <manual_dir>/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
(or the same under CheXpert-v1.0/ for the full-resolution release).
"""

  def _features(self) -> dict[str, Any]:
    return {
      "image": common.image_feature(),
      "image_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "view": tfds.features.Text(),
      "labels": common.labels_feature(len(common.CHEXPERT_LABELS)),
    }

  def _split_records(self, root: epath.Path) -> dict[str, list[dict[str, Any]]]:
    folder = next((root / f for f in FOLDERS if (root / f).is_dir()), root / FOLDERS[0])
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in self.SPLITS}
    for csv_name in ("train.csv", "valid.csv"):
      rows = self.csv(
        folder / csv_name, ("Path", "Frontal/Lateral", "AP/PA", *common.CHEXPERT_LABELS)
      )
      for row in rows:
        # CheXpert paths hold the patient number: logs name the CSV line only.
        path, where = row["Path"].strip(), row.where
        match = _PATIENT.search(path)
        if not match:
          self.skip("bad_path", where)
          continue
        patient = match.group(1)
        if csv_name == "valid.csv":
          split = "test"
        else:
          split = "train" if common.split_for_patient(patient) == "train" else "validation"
        record: dict[str, Any] = {"_key": path, "_where": where}
        by_split[split].append(record)
        view = row["Frontal/Lateral"].strip()
        if row["AP/PA"].strip() and view == "Frontal":
          view = row["AP/PA"].strip()
        try:
          labels = [
            common.chexpert_value(row[c], self.builder_config.uncertain)
            for c in common.CHEXPERT_LABELS
          ]
        except ValueError:
          record["_skip"] = ("bad_labels", where)
          continue
        if not view:
          record["_skip"] = ("unknown_view", where)
          continue
        image = common.safe_path(root, path)
        if image is None:
          record["_skip"] = ("outside_manual_dir", where)
          continue
        record.update(_image=image, image_id=path, patient_id=patient, view=view, labels=labels)
    return by_split

  def _example(self, record: dict[str, Any], png: bytes) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")} | {"image": png}
