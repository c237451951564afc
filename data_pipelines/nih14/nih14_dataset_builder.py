"""tfds builder for NIH ChestX-ray14 (images + `Data_Entry_2017[_v2020].csv` + official lists).

One example per image. Splits: `test_list.txt` is `test`; `train_val_list.txt` is cut by
patient hash into `train` (80%) and `validation` (20%), so no patient is in two splits
(the official lists are already patient-disjoint). Labels: the 14 NIH findings, multi-hot
(`No Finding` is all zeros). No text.
"""

from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from data_pipelines import common

NIH_LABELS = (
  "Atelectasis",
  "Cardiomegaly",
  "Effusion",
  "Infiltration",
  "Mass",
  "Nodule",
  "Pneumonia",
  "Pneumothorax",
  "Consolidation",
  "Edema",
  "Emphysema",
  "Fibrosis",
  "Pleural_Thickening",
  "Hernia",
)
ENTRY_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")


class Builder(common.CorpusBuilder):
  """NIH ChestX-ray14: 112,120 frontal images, 14 NLP-mined labels."""

  BUILDER_CONFIGS = common.make_configs([("default", "Images and 14 labels.", {})])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download from https://nihcc.app.box.com/v/ChestXray-NIHCC (or Kaggle `nih-chest-xrays/data`)
into manual_dir, as published:
  <manual_dir>/Data_Entry_2017_v2020.csv   (or the 2017 Data_Entry_2017.csv)
  <manual_dir>/train_val_list.txt
  <manual_dir>/test_list.txt
  <manual_dir>/images_001/images/00000001_000.png ... images_012/images/*.png
    (Kaggle layout; the Box tarballs images_01.tar.gz..images_12.tar.gz extract to
    <manual_dir>/images/*.png, which is read too)
"""

  def _features(self) -> dict[str, Any]:
    return {
      "image": common.image_feature(),
      "image_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "view": tfds.features.Text(),
      "labels": common.labels_feature(len(NIH_LABELS)),
    }

  def _split_records(self, root: epath.Path) -> dict[str, list[dict[str, Any]]]:
    entry = next((root / n for n in ENTRY_CSVS if (root / n).exists()), root / ENTRY_CSVS[0])
    rows = self.csv(entry, ("Image Index", "Finding Labels", "Patient ID", "View Position"))
    lists = {}
    for name in ("train_val_list.txt", "test_list.txt"):
      lists[name] = set(self.text(common.require(root / name, "official split list")).split())
    images = {}
    for folder in sorted(root.glob("images*")):
      for sub in (folder, folder / "images"):
        if sub.is_dir():
          images.update({p.name: p for p in sub.glob("*.png")})
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in self.SPLITS}
    for row in rows:
      # The image name starts with the patient number: logs name the CSV line only.
      name, patient, where = row["Image Index"].strip(), row["Patient ID"].strip(), row.where
      if name in lists["test_list.txt"]:
        split = "test"
      elif name in lists["train_val_list.txt"]:
        split = "train" if common.split_for_patient(patient) == "train" else "validation"
      else:
        self.skip("no_split", where)
        continue
      record: dict[str, Any] = {"_key": name, "_where": where}
      by_split[split].append(record)
      findings = {f.strip() for f in row["Finding Labels"].split("|")} - {"No Finding", ""}
      view = row["View Position"].strip()
      if name not in images:
        record["_skip"] = ("missing_image", where)
      elif findings - set(NIH_LABELS):
        record["_skip"] = ("bad_labels", where)
      elif not view:
        record["_skip"] = ("unknown_view", where)
      else:
        record.update(
          _image=images[name],
          image_id=name,
          patient_id=patient,
          view=view,
          labels=[int(l in findings) for l in NIH_LABELS],
        )
    return by_split

  def _example(self, record: dict[str, Any], png: bytes) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")} | {"image": png}
