"""tfds builder for MIMIC-CXR-JPG 2.x with the MIMIC-CXR free-text reports.

One example per image (dicom_id) whose study has a report with usable text. Report sections
are parsed (`common.report_fields`): FINDINGS, IMPRESSION, and a fallback text when neither
header exists. The split is the official one (`mimic-cxr-2.0.0-split.csv.gz`, `validate` is
stored as `validation`); labels are the study's CheXpert labels under the config's
uncertain-label policy. Configs: `paired` (uncertain kept as -1), `paired_u_ones`,
`paired_u_zeros`, each also as `<name>_<size>` for a shorter side other than 256.
"""

from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from data_pipelines import common

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
_SPLITS = {"train": "train", "validate": "validation", "test": "test"}


def study_dir(subject_id: str, study_id: str) -> str:
  """`files/p10/p10000032/s50414267` (the published MIMIC-CXR folder scheme)."""
  return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}"


class Builder(common.CorpusBuilder):
  """MIMIC-CXR-JPG images paired with their MIMIC-CXR report sections."""

  BUILDER_CONFIGS = common.make_configs(
    [
      ("paired", "Image-report pairs; uncertain labels kept as -1.", {"uncertain": "ignore"}),
      ("paired_u_ones", "Image-report pairs; uncertain labels as 1.", {"uncertain": "ones"}),
      ("paired_u_zeros", "Image-report pairs; uncertain labels as 0.", {"uncertain": "zeros"}),
    ]
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Credentialed PhysioNet access is required (https://physionet.org/content/mimic-cxr-jpg/ and
https://physionet.org/content/mimic-cxr/). manual_dir is the MIMIC-CXR-JPG root, as downloaded:
  <manual_dir>/mimic-cxr-2.0.0-metadata.csv.gz   (dicom_id, subject_id, study_id, ViewPosition)
  <manual_dir>/mimic-cxr-2.0.0-split.csv.gz      (dicom_id, study_id, subject_id, split)
  <manual_dir>/mimic-cxr-2.0.0-chexpert.csv.gz   (subject_id, study_id, 14 CheXpert labels)
  <manual_dir>/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
and the reports: unzip mimic-cxr-reports.zip (from the MIMIC-CXR project) into the same
manual_dir, which puts each study's report beside its image folder:
  <manual_dir>/files/p10/p10000032/s50414267.txt
"""

  def _features(self) -> dict[str, Any]:
    return {
      "image": common.image_feature(),
      "image_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "study_id": tfds.features.Text(),
      "view": tfds.features.Text(),
      **common.text_features(),
      "labels": common.labels_feature(len(common.CHEXPERT_LABELS)),
    }

  def _split_records(self, root: epath.Path) -> dict[str, list[dict[str, Any]]]:
    meta = self.csv(root / METADATA_CSV, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    split_of = {
      r["dicom_id"]: r["split"] for r in self.csv(root / SPLIT_CSV, ("dicom_id", "split"))
    }
    labels_of = {}
    for r in self.csv(root / CHEXPERT_CSV, ("subject_id", "study_id", *common.CHEXPERT_LABELS)):
      try:
        labels_of[r["study_id"]] = [
          common.chexpert_value(r[c], self.builder_config.uncertain) for c in common.CHEXPERT_LABELS
        ]
      except ValueError:
        pass  # Counted as missing_labels below if one of its images is used.
    reports: dict[str, tuple[str, str, str] | str] = {}
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in self.SPLITS}
    for row in meta:
      dicom_id, subject, study = row["dicom_id"], row["subject_id"], row["study_id"]
      # Logs name the row by line and dicom_id, never by subject (a patient id) or its path.
      where = f"{row.where} (dicom_id {dicom_id[:64]!r})"
      split = _SPLITS.get(split_of.get(dicom_id, ""))
      record: dict[str, Any] = {"_key": dicom_id, "_where": where}
      if split is None:
        self.skip("no_split", where)
        continue
      by_split[split].append(record)
      view = row["ViewPosition"].strip()
      if not view:
        record["_skip"] = ("unknown_view", where)
        continue
      if study not in labels_of:
        record["_skip"] = ("missing_labels", where)
        continue
      folder = common.safe_path(root, study_dir(subject, study))
      image = common.safe_path(root, study_dir(subject, study), f"{dicom_id}.jpg")
      if folder is None or image is None:
        record["_skip"] = ("outside_manual_dir", where)
        continue
      if study not in reports:
        reports[study] = self._report(folder.parent / f"{folder.name}.txt", root)
      report = reports[study]
      if isinstance(report, str):
        record["_skip"] = (report, where)
        continue
      record.update(
        report,
        _image=image,
        image_id=dicom_id,
        patient_id=subject,
        study_id=study,
        view=view,
        labels=labels_of[study],
      )
    return by_split

  def _report(self, path: epath.Path, root: epath.Path) -> dict[str, Any] | str:
    """The text features of a study's report, or the reason it has none."""
    if not common.inside(root, path):
      return "outside_manual_dir"
    try:
      raw = path.read_bytes()
    except FileNotFoundError:
      return "missing_report"
    except OSError:
      return "unreadable_report"
    fields = common.report_fields(raw.decode("utf-8", errors="replace"))
    text, reason = common.text_record(*fields)
    return text or reason

  def _example(self, record: dict[str, Any], png: bytes) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")} | {"image": png}
