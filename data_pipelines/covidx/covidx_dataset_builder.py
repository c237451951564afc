"""tfds builder for COVIDx CXR (COVID-Net), 3 classes: normal / pneumonia / COVID-19.

One example per image. Label files are the COVID-Net "A" (3-class) releases, one line per
image, space-separated: `patient_id filename class [source]` (COVIDx v1-v5, i.e.
train_split_v1..v3 / train_COVIDx2..5.txt, and 7A/8A have no `source` column; 9A and CXR-3A
add it). Class ids follow COVID-Net's mapping: normal 0,
pneumonia 1 (non-COVID-19), COVID-19 2. The binary releases (COVIDx 6, 7B, 8B, 9B, CXR-2,
CXR-3B, CXR-4: classes positive/negative, the `train.txt`/`test.txt` on Kaggle) cannot be
mapped to three classes and are refused with a DataError naming the file. Splits: the
official test file is `test`; the official train file is cut by patient hash into `train`
(80%) and `validation` (20%). No view is published (`view` is '').
"""

from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import common
from medvl_jax.errors import DataError

CLASSES = ("normal", "pneumonia", "COVID-19")  # COVID-Net's `mapping`, in id order.
BINARY_CLASSES = ("positive", "negative")
# (train, test) label files, newest 3-class release first; train.txt/test.txt (the Kaggle
# download's names) last, read only if they hold 3-class labels.
LABEL_FILES = (
  ("train_COVIDx_CXR-3A.txt", "test_COVIDx_CXR-3A.txt"),
  ("train_COVIDx9A.txt", "test_COVIDx9A.txt"),
  ("train_COVIDx8A.txt", "test_COVIDx8A.txt"),
  ("train_COVIDx7A.txt", "test_COVIDx7A.txt"),
  ("train_COVIDx5.txt", "test_COVIDx5.txt"),
  ("train_COVIDx4.txt", "test_COVIDx4.txt"),
  ("train_COVIDx3.txt", "test_COVIDx3.txt"),
  ("train_COVIDx2.txt", "test_COVIDx2.txt"),
  ("train_split_v3.txt", "test_split_v3.txt"),
  ("train_split_v2.txt", "test_split_v2.txt"),
  ("train_split_v1.txt", "test_split_v1.txt"),
  ("train.txt", "test.txt"),
)


def parse_line(line: str) -> tuple[str, str, str, str] | None:
  """`patient_id filename class [source]` -> (patient_id, filename, class, source).

  The class is the last token that is a class name (3-class or binary), so a filename with
  spaces (some covid-chestxray-dataset images) survives. None if the line has no class.
  """
  tokens = line.split()
  for i in range(len(tokens) - 1, 1, -1):
    if tokens[i] in CLASSES or tokens[i] in BINARY_CLASSES:
      return tokens[0], " ".join(tokens[1:i]), tokens[i], " ".join(tokens[i + 1 :])
  return None


class Builder(common.CorpusBuilder):
  """COVIDx CXR: ~30k radiographs from 8 public sources, normal/pneumonia/COVID-19."""

  BUILDER_CONFIGS = common.make_configs([("default", "Images and 3-class label.", {})])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the COVIDx CXR images from https://www.kaggle.com/andyczhao/covidx-cxr2 (or build
them with the COVID-Net scripts, https://github.com/lindawangg/COVID-Net/blob/master/docs/
COVIDx.md) and the 3-class label files of the same release from the repository's labels/
folder (e.g. train_COVIDx_CXR-3A.txt and test_COVIDx_CXR-3A.txt), into manual_dir:
  <manual_dir>/train/<filename>    <manual_dir>/test/<filename>
  <manual_dir>/train_COVIDx_CXR-3A.txt   <manual_dir>/test_COVIDx_CXR-3A.txt
(or train_COVIDx9A/8A/7A/5/4/3/2.txt, train_split_v1/v2/v3.txt and their test_ files; or
train.txt/test.txt if they hold normal/pneumonia/COVID-19 labels). The Kaggle train.txt/test.txt
of COVIDx CXR-2 and later are binary (positive/negative) and are not enough on their own.
"""

  def _features(self) -> dict[str, Any]:
    return {
      "image": common.image_feature(),
      "image_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "view": tfds.features.Text(),
      "source": tfds.features.Text(),
      "label": tfds.features.ClassLabel(names=CLASSES),
      "labels": common.labels_feature(len(CLASSES)),
    }

  def _label_files(self, root: epath.Path) -> tuple[epath.Path, epath.Path]:
    for train, test in LABEL_FILES:
      if (root / train).exists() or (root / test).exists():
        return (
          common.require(root / train, "COVIDx train label file"),
          common.require(root / test, "COVIDx test label file"),
        )
    raise DataError(
      f"{root / LABEL_FILES[0][0]}: required file not found (COVIDx label "
      f"file; also looked for {', '.join(t for t, _ in LABEL_FILES[1:])})"
    )

  def _split_records(self, root: epath.Path) -> dict[str, list[dict[str, Any]]]:
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in self.SPLITS}
    seen: set[tuple[str, str]] = set()
    for part, path in zip(("train", "test"), self._label_files(root)):
      numbered = [(n, l) for n, l in enumerate(self.text(path).splitlines(), 1) if l.strip()]
      parsed = [parse_line(l) for _, l in numbered]
      valid = [p for p in parsed if p]
      if valid and all(p[2] in BINARY_CLASSES for p in valid):
        raise DataError(
          f"{path}: binary COVID-19 positive/negative labels (COVIDx 6/7B/8B/9B/"
          f"CXR-2/CXR-3B/CXR-4); the 3-class builder needs a normal/pneumonia/"
          f"COVID-19 label file such as {LABEL_FILES[0][0]}"
        )
      folder = root / part
      for (n, _), fields in zip(numbered, parsed):
        # Lines start with the patient id: logs name the file and line only.
        where = f"{path.name}:{n}"
        if fields is None or fields[2] not in CLASSES:
          self.skip("bad_labels", where)
          continue
        patient, filename, cls, source = fields
        if (part, filename) in seen:
          self.skip("duplicate_key", where)
          continue
        seen.add((part, filename))
        if part == "test":
          split = "test"
        else:
          split = "train" if common.split_for_patient(patient) == "train" else "validation"
        record: dict[str, Any] = {"_key": f"{part}/{filename}", "_where": where}
        by_split[split].append(record)
        image = common.safe_path(folder, filename)
        if image is None or not common.inside(root, image):
          record["_skip"] = ("outside_manual_dir", where)
          continue
        if not image.is_file():
          record["_skip"] = ("missing_image", where)
          continue
        label = CLASSES.index(cls)
        record.update(
          _image=image,
          image_id=f"{part}/{filename}",
          patient_id=patient,
          view="",
          source=source,
          label=label,
          labels=np.eye(len(CLASSES), dtype=np.int32)[label],
        )
    return by_split

  def _example(self, record: dict[str, Any], png: bytes) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")} | {"image": png}
