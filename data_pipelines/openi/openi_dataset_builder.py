"""tfds builder for Open-i / IU X-ray: `ecgen-radiology/*.xml` reports + `NLMCXR_png/*.png`.

One example per image (`parentImage id`) of a report with usable text. Text: the FINDINGS and
IMPRESSION `AbstractText` of the XML (fallback: IMPRESSION alone, or FINDINGS alone). Labels:
14 CheXpert-style classes from the report's MeSH major terms by keyword rules (METHODS.md);
`No Finding` when the major terms are exactly `normal`. View: Frontal/Lateral from the optional
`indiana_projections.csv` (Kaggle `raddar/chest-xrays-indiana-university`), else ''.
Splits by report (each IU report is one patient's exam; patient ids are not published).
"""
from typing import Any
import xml.etree.ElementTree as ET

from etils import epath
import tensorflow_datasets as tfds

from data_pipelines import common

# CheXpert label -> lower-case substrings of a MeSH major term that mark it.
MESH_RULES = {
    "Enlarged Cardiomediastinum": ("mediastinum/enlarged", "mediastinum/widened",
                                   "cardiomediastinal"),
    "Cardiomegaly": ("cardiomegaly",),
    "Lung Opacity": ("opacity", "infiltrat", "density", "densities"),
    "Lung Lesion": ("nodule", "mass", "lesion", "granuloma"),
    "Edema": ("edema",),
    "Consolidation": ("consolidation",),
    "Pneumonia": ("pneumonia",),
    "Atelectasis": ("atelectas",),
    "Pneumothorax": ("pneumothorax",),
    "Pleural Effusion": ("pleural effusion",),
    "Pleural Other": ("pleural/thicken", "thickening/pleura", "pleural thickening",
                      "fibrothorax"),
    "Fracture": ("fracture",),
    "Support Devices": ("catheter", "tube", "device", "pacemaker", "stent", "prosthes",
                        "surgical instruments", "implant"),
}


def mesh_labels(major: list[str]) -> list[int]:
  terms = [t.strip().lower() for t in major if t.strip()]
  out = []
  for name in common.CHEXPERT_LABELS:
    if name == "No Finding":
      out.append(int(bool(terms) and all(t == "normal" for t in terms)))
    else:
      out.append(int(any(k in t for t in terms for k in MESH_RULES[name])))
  return out


class Builder(common.CorpusBuilder):
  """Open-i Indiana University chest X-ray collection: 3,955 reports, 7,470 images."""

  BUILDER_CONFIGS = common.make_configs([("paired", "Image-report pairs.", {})])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download from https://openi.nlm.nih.gov/faq (NLMCXR_reports.tgz and NLMCXR_png.tgz) and
extract both into manual_dir:
  <manual_dir>/ecgen-radiology/1.xml ...        (reports; AbstractText FINDINGS/IMPRESSION,
                                                 MeSH <major>,
                                                 <parentImage id="CXR1_1_IM-0001-3001">)
  <manual_dir>/NLMCXR_png/CXR1_1_IM-0001-3001.png ...
Optional, for Frontal/Lateral: <manual_dir>/indiana_projections.csv (uid, filename,
projection) from Kaggle raddar/chest-xrays-indiana-university.
"""
  _CITATION = """\
@article{demner2016preparing, title={Preparing a collection of radiology examinations for
  distribution and retrieval}, author={Demner-Fushman, Dina and others},
  journal={JAMIA}, volume={23}, number={2}, pages={304--310}, year={2016}}
"""

  def _features(self) -> dict[str, Any]:
    return {"image": common.image_feature(), "image_id": tfds.features.Text(),
            "patient_id": tfds.features.Text(), "view": tfds.features.Text(),
            **common.text_features(),
            "mesh_major": tfds.features.Sequence(tfds.features.Text()),
            "labels": common.labels_feature(len(common.CHEXPERT_LABELS))}

  def _split_records(self, root: epath.Path) -> dict[str, list[dict[str, Any]]]:
    reports = sorted(common.require(root / "ecgen-radiology", "report XML folder").glob("*.xml"))
    if not reports:
      raise common.DataError(f"{root / 'ecgen-radiology'}: no report XML files")
    png_dir = common.require(root / "NLMCXR_png", "PNG folder")
    views = {}
    if (root / "indiana_projections.csv").exists():
      for r in common.read_csv(root / "indiana_projections.csv", ("filename", "projection")):
        views["CXR" + r["filename"].replace(".dcm.png", "")] = r["projection"].strip()
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in self.SPLITS}
    for path in reports:
      try:
        tree = ET.fromstring(path.read_bytes())
      except ET.ParseError:
        self.skip("unreadable_report", str(path))
        continue
      report_id = path.stem
      split = common.split_for_patient(report_id)
      sections = {(a.get("Label") or "").upper(): common.sentences_lib.normalize(a.text or "")
                  for a in tree.iter("AbstractText")}
      findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
      text, reason = common.text_record(findings, impression,
                                        " ".join(t for t in (findings, impression) if t))
      major = [m.text or "" for m in tree.iter("major")]
      for image in tree.iter("parentImage"):
        image_id = image.get("id", "")
        record: dict[str, Any] = {"_key": image_id}
        by_split[split].append(record)
        if reason:
          record["_skip"] = (reason, f"report {report_id}")
          continue
        record.update(text, _image=png_dir / f"{image_id}.png", image_id=image_id,
                      patient_id=report_id, view=views.get(image_id, ""),
                      mesh_major=major, labels=mesh_labels(major))
    return by_split

  def _example(self, record: dict[str, Any], png: bytes) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")} | {"image": png}
