"""tfds builder for Open-i / IU X-ray: `ecgen-radiology/*.xml` reports + `NLMCXR_png/*.png`.

One example per image (`parentImage id`) of a report with usable text. Text: the FINDINGS and
IMPRESSION `AbstractText` of the XML (fallback: IMPRESSION alone, or FINDINGS alone). Labels:
14 CheXpert-style classes from the report's MeSH major terms, derived as the seed paper's
first author published them (github.com/xiaosongwang/openi_processor, see `PUBLISHED_WORDS`):
substring words per label on the normalised terms, and `No Finding` = no other label positive
(so a report indexed `normal`, `No Indexing` or only with terms outside the table, e.g.
`Calcified Granuloma`, is No Finding). The published label file keeps one frontal image per
report; this builder labels every image of the report (filter frontal ones with `view`). Agreement
with the published labels on the real 3,955 reports: data_pipelines/README.md. View:
Frontal/Lateral from the optional `indiana_projections.csv` (Kaggle
`raddar/chest-xrays-indiana-university`), else ''. Splits by report (each IU report is one
patient's exam; patient ids are not published).
"""

from typing import Any
import xml.etree.ElementTree as ET

from etils import epath
import tensorflow_datasets as tfds

from data_pipelines import common

# The published Open-i label derivation (the seed paper, Wang et al. arXiv 2103.16022: its first
# author's repository github.com/xiaosongwang/openi_processor, `openi_gnerate_label.py` with the
# `mimic`-style word lists of commit a643559, which produced its `front_label_list_chexpert.csv`):
# each MeSH major term is lower-cased, spaces dropped, "," and "/" turned into "-"; a label is
# positive when one of its words occurs as a substring of the report's normalised terms; `No
# Finding` is positive exactly when no other label is. The word table below is that data,
# keyed by our CheXpert label names.
PUBLISHED_WORDS = {
  "Enlarged Cardiomediastinum": ("shadow-enlarged",),
  "Cardiomegaly": ("cardiomegaly",),
  "Lung Opacity": ("opacity-lung", "density-lung"),
  "Lung Lesion": ("mass", "nodule"),
  "Edema": ("pulmonaryedema",),
  "Consolidation": ("consolidation",),
  "Pneumonia": ("pneumonia",),
  "Atelectasis": ("atelect",),
  "Pneumothorax": ("pneumothorax",),
  "Pleural Effusion": ("effusion",),
  "Pleural Other": ("pleural-other", "thickening-pleura", "cicatrix-pleura"),
  "Fracture": ("fracture",),
  "Support Devices": ("device", "catheters"),
}


def normalize_mesh(term: str) -> str:
  """A MeSH major term as the published derivation matches it: 'Cardiac Shadow/enlarged' ->
  'cardiacshadow-enlarged', 'Catheters, Indwelling/right' -> 'catheters-indwelling-right'."""
  return term.lower().replace(" ", "").replace(",", "-").replace("/", "-")


def mesh_labels(major: list[str]) -> list[int]:
  """The 14 CheXpert-style labels (`common.CHEXPERT_LABELS` order) of a report's MeSH major
  terms under the published derivation (see `PUBLISHED_WORDS`)."""
  # The terms are matched as one string, as published (" -- " cannot occur inside a term).
  joined = " -- ".join(normalize_mesh(t) for t in major if t.strip())
  positive = {name: any(w in joined for w in words) for name, words in PUBLISHED_WORDS.items()}
  positive["No Finding"] = not any(positive.values())
  return [int(positive[name]) for name in common.CHEXPERT_LABELS]


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

  def _features(self) -> dict[str, Any]:
    return {
      "image": common.image_feature(),
      "image_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "view": tfds.features.Text(),
      **common.text_features(),
      "mesh_major": tfds.features.Sequence(tfds.features.Text()),
      "labels": common.labels_feature(len(common.CHEXPERT_LABELS)),
    }

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
      sections = {
        (a.get("Label") or "").upper(): common.sentences_lib.normalize(a.text or "")
        for a in tree.iter("AbstractText")
      }
      findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
      text, reason = common.text_record(
        findings, impression, " ".join(t for t in (findings, impression) if t)
      )
      major = [m.text or "" for m in tree.iter("major")]
      for image in tree.iter("parentImage"):
        image_id = image.get("id", "")
        record: dict[str, Any] = {"_key": image_id}
        by_split[split].append(record)
        if reason:
          record["_skip"] = (reason, f"report {report_id}")
          continue
        record.update(
          text,
          _image=png_dir / f"{image_id}.png",
          image_id=image_id,
          patient_id=report_id,
          view=views.get(image_id, ""),
          mesh_major=major,
          labels=mesh_labels(major),
        )
    return by_split

  def _example(self, record: dict[str, Any], png: bytes) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")} | {"image": png}
