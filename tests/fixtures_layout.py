"""Tiny corpus trees in each corpus's published layout, built from the real sample data.

Images are real radiographs from `covid_cxr_notes/` or `nih14_sample/` (re-encoded to the
corpus's file format where it differs: JPEG for MIMIC-CXR-JPG and CheXpert, DICOM for RSNA);
report text is real IU/Open-i report text from `iu_reports/`. Identifiers follow each
corpus's scheme. Each function returns the manual_dir it filled.
"""

import csv
import gzip
import io
import pathlib

from PIL import Image

from data_pipelines import common

CHEXPERT = common.CHEXPERT_LABELS


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def iu_reports(sample: pathlib.Path) -> list[dict[str, str]]:
  return read_csv(sample / "iu_reports" / "iu_reports_2000.csv")


def covid_pairs(sample: pathlib.Path) -> list[dict[str, str]]:
  return read_csv(sample / "covid_cxr_notes" / "pairs.csv")


def nih_rows(sample: pathlib.Path) -> list[dict[str, str]]:
  return read_csv(sample / "nih14_sample" / "labels.csv")


def write_csv(path: pathlib.Path, fieldnames, rows, *, gz: bool = False) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  out = io.StringIO(newline="")
  writer = csv.DictWriter(out, fieldnames=fieldnames, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  data = out.getvalue().encode("utf-8")
  path.write_bytes(gzip.compress(data) if gz else data)


def save_as(src: pathlib.Path, dst: pathlib.Path, fmt: str) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  with Image.open(src) as img:
    img.convert("L").save(dst, format=fmt)


def mimic_report(iu: dict[str, str], *, findings: bool = True) -> str:
  """An IU report's real sections in the MIMIC-CXR report file format."""
  parts = [
    "                                 FINAL REPORT",
    " EXAMINATION:  CHEST (PA AND LAT)",
    "",
    f" INDICATION:  {iu['indication']}",
    "",
    f" COMPARISON:  {iu['comparison']}",
    "",
  ]
  if findings:
    parts += [" FINDINGS:", "", " " + iu["findings"], ""]
  parts += [" IMPRESSION:", "", " " + iu["impression"], ""]
  return "\n".join(parts)


def labels_row(i: int) -> dict[str, str]:
  """A deterministic mix of 1.0 / 0.0 / -1.0 / blank across the 14 labels."""
  cells = ("1.0", "0.0", "-1.0", "")
  return {c: cells[(i + j) % 4] for j, c in enumerate(CHEXPERT)}


def mimic_cxr(
  sample: pathlib.Path, root: pathlib.Path, n_patients: int = 12, min_images: int = 2
) -> pathlib.Path:
  """MIMIC-CXR-JPG 2.0.0 + mimic-cxr-reports layout: 1-3 images per study, 1-2 studies
  per patient; images from covid_cxr_notes (JPEG), reports from IU text."""
  pairs, reports = covid_pairs(sample), iu_reports(sample)
  by_patient: dict[str, list[dict[str, str]]] = {}
  for row in pairs:
    by_patient.setdefault(row["patientid"], []).append(row)
  patients = [p for p in sorted(by_patient) if len(by_patient[p]) >= min_images][:n_patients]
  meta, split, chexpert = [], [], []
  for pi, pid in enumerate(patients):
    subject = str(10000000 + (pi + 1) * 37)
    split_name = ("train", "train", "train", "validate", "test")[pi % 5]
    images = by_patient[pid][:4]
    studies = [images[:2], images[2:]] if len(images) > 2 else [images]
    for si, study_images in enumerate(studies):
      study = str(50000000 + (pi + 1) * 100 + si)
      iu = reports[(pi * 2 + si) % len(reports)]
      sdir = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
      sdir.parent.mkdir(parents=True, exist_ok=True)
      (sdir.parent / f"s{study}.txt").write_text(mimic_report(iu), encoding="utf-8")
      chexpert.append({"subject_id": subject, "study_id": study, **labels_row(pi + si)})
      for ii, row in enumerate(study_images):
        dicom = f"{(pi + 1):08x}-{si:08x}-{ii:08x}-00000000-{pi:08x}"
        save_as(sample / "covid_cxr_notes" / row["image_file"], sdir / f"{dicom}.jpg", "JPEG")
        view = row["view"] if row["view"] in ("PA", "AP", "L") else "PA"
        meta.append(
          {
            "dicom_id": dicom,
            "subject_id": subject,
            "study_id": study,
            "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
            "ViewPosition": "LATERAL" if view == "L" else view,
            "Rows": "3056",
            "Columns": "2544",
            "StudyDate": "21800506",
            "StudyTime": "213014.531",
            "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
            "ViewCodeSequence_CodeMeaning": "postero-anterior",
            "PatientOrientationCodeSequence_CodeMeaning": "Erect",
          }
        )
        split.append(
          {"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split_name}
        )
  write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", list(meta[0]), meta, gz=True)
  write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", list(split[0]), split, gz=True)
  write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", list(chexpert[0]), chexpert, gz=True)
  return root


def read_csv_gz(path: pathlib.Path) -> list[dict[str, str]]:
  return list(
    csv.DictReader(io.StringIO(gzip.decompress(path.read_bytes()).decode("utf-8"), newline=""))
  )


NIH_ENTRY_COLUMNS = (
  "Image Index",
  "Finding Labels",
  "Follow-up #",
  "Patient ID",
  "Patient Age",
  "Patient Gender",
  "View Position",
  "OriginalImage[Width",
  "Height]",
  "OriginalImagePixelSpacing[x",
  "y]",
)


def nih14(sample: pathlib.Path, root: pathlib.Path, n: int = 30) -> pathlib.Path:
  """NIH ChestX-ray14 (Kaggle layout): Data_Entry_2017_v2020.csv, train_val_list.txt,
  test_list.txt, images_001/images/*.png and images_002/images/*.png (real NIH images)."""
  rows = nih_rows(sample)[:n]
  entries = []
  for i, r in enumerate(rows):
    folder = root / f"images_{1 + i % 2:03d}" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    image = sample / "nih14_sample" / r["image_file"]
    (folder / r["image_index"]).write_bytes(image.read_bytes())
    entries.append(
      dict(
        zip(
          NIH_ENTRY_COLUMNS,
          (
            r["image_index"],
            r["finding_labels"],
            r["follow_up"],
            r["patient_id"],
            r["age"],
            r["sex"],
            r["view_position"],
            r["original_width"],
            r["original_height"],
            "0.143",
            "0.143",
          ),
        )
      )
    )
  write_csv(root / "Data_Entry_2017_v2020.csv", NIH_ENTRY_COLUMNS, entries)
  test = [r["image_index"] for i, r in enumerate(rows) if i % 4 == 0]
  (root / "test_list.txt").write_text("\n".join(test) + "\n")
  (root / "train_val_list.txt").write_text(
    "\n".join(r["image_index"] for r in rows if r["image_index"] not in test) + "\n"
  )
  return root


CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT)


def chexpert(sample: pathlib.Path, root: pathlib.Path, n_patients: int = 14) -> pathlib.Path:
  """CheXpert-v1.0-small: train.csv / valid.csv and train|valid/patientNNNNN/studyN/
  viewN_frontal.jpg (real covid_cxr_notes images as JPEG)."""
  pairs = covid_pairs(sample)
  by_patient: dict[str, list[dict[str, str]]] = {}
  for row in pairs:
    by_patient.setdefault(row["patientid"], []).append(row)
  patients = [p for p in sorted(by_patient) if len(by_patient[p]) >= 2][:n_patients]
  # Patient numbers whose hash (common.split_for_patient) covers train and validation.
  held = [k for k in range(1, 500) if common.split_for_patient(f"patient{k:05d}") != "train"]
  numbers = held[:3] + [k for k in range(1, 500) if k not in held][: len(patients)]
  csvs = {"train": [], "valid": []}
  for pi, pid in enumerate(patients):
    part = "valid" if pi % 4 == 3 else "train"
    for vi, row in enumerate(by_patient[pid][:3]):
      lateral = row["view"] == "L"
      rel = (
        f"CheXpert-v1.0-small/{part}/patient{numbers[pi]:05d}/study1/"
        f"view{vi + 1}_{'lateral' if lateral else 'frontal'}.jpg"
      )
      save_as(sample / "covid_cxr_notes" / row["image_file"], root / rel, "JPEG")
      csvs[part].append(
        {
          "Path": rel,
          "Sex": row["sex"] or "Unknown",
          "Age": row["age"] or "0",
          "Frontal/Lateral": "Lateral" if lateral else "Frontal",
          "AP/PA": "" if lateral else (row["view"] if row["view"] in ("AP", "PA") else "AP"),
          **labels_row(pi + vi),
        }
      )
  for part, rows in csvs.items():
    write_csv(root / "CheXpert-v1.0-small" / f"{part}.csv", CHEXPERT_COLUMNS, rows)
  return root


def openi_xml(iu: dict[str, str]) -> str:
  """An IU report in the ecgen-radiology XML format (real sections, MeSH and image ids)."""
  from xml.sax.saxutils import escape, quoteattr  # pylint: disable=g-import-not-at-top

  abstract = "".join(
    f'\n            <AbstractText Label="{label}">{escape(iu[col])}</AbstractText>'
    for label, col in (
      ("COMPARISON", "comparison"),
      ("INDICATION", "indication"),
      ("FINDINGS", "findings"),
      ("IMPRESSION", "impression"),
    )
  )
  major = "".join(f"\n      <major>{escape(t)}</major>" for t in iu["mesh_major"].split(";") if t)
  images = "".join(
    f"\n   <parentImage id={quoteattr(i)}>\n      <figureId>F{n + 1}</figureId>\n"
    f'      <caption>{escape(iu["image_caption"])}</caption>\n      <panel type="single">\n'
    f"         <url>/hadoop/storage/radiology/extract/{escape(i)}.jpg</url>\n"
    f"      </panel>\n   </parentImage>"
    for n, i in enumerate(iu["image_ids"].split(";"))
    if i
  )
  return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="{iu["uid"]}"/>
   <pmcId id="{iu["report_id"]}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{iu["report_id"]}"/>
   <licenseType>open-access</licenseType>
   <licenseURL>{iu["license_url"]}</licenseURL>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>{abstract}
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>{major}
   </MeSH>{images}
</eCitation>
"""


def openi(
  sample: pathlib.Path, root: pathlib.Path, n_reports: int = 16, report_ids: tuple[str, ...] = ()
) -> pathlib.Path:
  """Open-i: ecgen-radiology/<report_id>.xml (real IU reports), NLMCXR_png/<image id>.png
  (real NIH sample radiographs standing in for the IU images, which are not in the sample),
  and the Kaggle indiana_projections.csv. The first `n_reports` reports with images, or those
  with the given `report_ids`."""
  reports = [r for r in iu_reports(sample) if r["image_projections"]]
  reports = (
    [r for r in reports if r["report_id"] in report_ids] if report_ids else reports[:n_reports]
  )
  # Mix normal and abnormal reports so that several MeSH-derived labels occur.
  nih = nih_rows(sample)
  (root / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
  (root / "NLMCXR_png").mkdir(parents=True, exist_ok=True)
  projections, k = [], 0
  for iu in reports:
    (root / "ecgen-radiology" / f"{iu['report_id']}.xml").write_text(openi_xml(iu))
    for image_id, proj in zip(iu["image_ids"].split(";"), iu["image_projections"].split(";")):
      (root / "NLMCXR_png" / f"{image_id}.png").write_bytes(
        (sample / "nih14_sample" / nih[k]["image_file"]).read_bytes()
      )
      k += 1
      projections.append(
        {
          "uid": iu["report_id"],
          "filename": image_id.removeprefix("CXR") + ".dcm.png",
          "projection": proj,
        }
      )
  write_csv(root / "indiana_projections.csv", ("uid", "filename", "projection"), projections)
  return root


RSNA_OPACITY = ("Pneumonia", "Consolidation", "Infiltration")


def write_dicom(
  png: pathlib.Path,
  dst: pathlib.Path,
  patient_id: str,
  view: str,
  *,
  monochrome1: bool = False,
  bits: int = 8,
) -> None:
  """A real DICOM file (CR) holding a sample radiograph, written with pydicom as the RSNA
  files are laid out: 8-bit MONOCHROME2 is JPEG Baseline (RSNA's transfer syntax); 12-bit in
  16 and MONOCHROME1 (stored inverted) are uncompressed Explicit VR Little Endian."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom.dataset import FileMetaDataset  # pylint: disable=g-import-not-at-top
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # pylint: disable=g-import-not-at-top

  with Image.open(png) as img:
    arr = np.asarray(img.convert("L"))
  if bits > 8:
    arr = arr.astype(np.uint16) * 16  # 12 bits stored in 16.
    if monochrome1:
      arr = 4095 - arr
  elif monochrome1:
    arr = 255 - arr
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture, as RSNA.
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = pydicom.Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
  ds.PatientID = ds.PatientName = patient_id
  ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", view
  ds.ConversionType = "WSD"
  ds.Rows, ds.Columns = arr.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
  ds.BitsAllocated = 16 if bits > 8 else 8
  ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
  ds.PixelData = arr.tobytes()
  if bits == 8 and not monochrome1:
    from pydicom.encaps import encapsulate  # pylint: disable=g-import-not-at-top
    from pydicom.uid import JPEGBaseline8Bit  # pylint: disable=g-import-not-at-top

    jpeg = io.BytesIO()
    Image.fromarray(arr).save(jpeg, format="JPEG", quality=95)
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    meta.TransferSyntaxUID = JPEGBaseline8Bit
  dst.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(dst, enforce_file_format=True)


def rsna_pneumonia(sample: pathlib.Path, root: pathlib.Path, n: int = 24) -> pathlib.Path:
  """RSNA Pneumonia Detection (Kaggle stage 2): stage_2_train_labels.csv (one row per box),
  stage_2_detailed_class_info.csv and stage_2_train_images/<patientId>.dcm, real DICOM written
  from real NIH sample radiographs (RSNA's images are NIH's). Target 1 where the NIH finding
  is an opacity (pneumonia/consolidation/infiltration), with one or two boxes. Patient 1 is
  MONOCHROME1, 2 is 12-bit MONOCHROME2, 3 is 12-bit MONOCHROME1."""
  import uuid  # pylint: disable=g-import-not-at-top

  labels, classes = [], []
  for i, r in enumerate(nih_rows(sample)[:n]):
    pid = str(uuid.uuid5(uuid.NAMESPACE_URL, "rsna/" + r["image_index"]))
    findings = set(r["finding_labels"].split("|"))
    write_dicom(
      sample / "nih14_sample" / r["image_file"],
      root / "stage_2_train_images" / f"{pid}.dcm",
      pid,
      r["view_position"] or "PA",
      monochrome1=i in (1, 3),
      bits=12 if i in (2, 3) else 8,
    )
    if findings & set(RSNA_OPACITY):
      boxes = [(264.0 + 3 * i, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0)][: 1 + i % 2]
      labels += [
        dict(zip(("patientId", "x", "y", "width", "height", "Target"), (pid, *b, 1))) for b in boxes
      ]
      classes.append({"patientId": pid, "class": "Lung Opacity"})
    else:
      labels.append({"patientId": pid, "x": "", "y": "", "width": "", "height": "", "Target": 0})
      classes.append(
        {
          "patientId": pid,
          "class": "Normal" if findings == {"No Finding"} else "No Lung Opacity / Not Normal",
        }
      )
  write_csv(
    root / "stage_2_train_labels.csv", ("patientId", "x", "y", "width", "height", "Target"), labels
  )
  write_csv(root / "stage_2_detailed_class_info.csv", ("patientId", "class"), classes)
  return root


def covidx(
  sample: pathlib.Path, root: pathlib.Path, n_covid: int = 10, n_other: int = 8
) -> pathlib.Path:
  """COVIDx CXR-3 layout: train/ and test/ image folders, the 3-class label files
  train_COVIDx_CXR-3A.txt / test_COVIDx_CXR-3A.txt (`patient_id filename class source`) and
  the Kaggle binary train.txt / test.txt beside them. COVID-19 images are the sample's real
  covid-chestxray-dataset ones (source `cohen`, 1-2 per patient); normal and pneumonia are
  real NIH radiographs under RSNA-style uuid names (source `rsna`, as COVIDx takes them)."""
  import uuid  # pylint: disable=g-import-not-at-top

  by_patient: dict[str, list[dict[str, str]]] = {}
  for row in covid_pairs(sample):
    if row["finding"].startswith("COVID-19"):
      by_patient.setdefault(row["patientid"], []).append(row)
  items = []  # (patient, source image, filename, class, source)
  for pid in sorted(by_patient, key=lambda p: (-len(by_patient[p]), p))[:n_covid]:
    for row in by_patient[pid][:2]:
      items.append(
        (
          pid,
          sample / "covid_cxr_notes" / row["image_file"],
          pathlib.Path(row["image_file"]).name,
          "COVID-19",
          "cohen",
        )
      )
  nih = nih_rows(sample)
  for cls, match in (
    ("normal", lambda f: f == "No Finding"),
    ("pneumonia", lambda f: "Pneumonia" in f),
  ):
    for r in [r for r in nih if match(r["finding_labels"])][:n_other]:
      pid = str(uuid.uuid5(uuid.NAMESPACE_URL, "covidx/" + r["image_index"]))
      items.append((pid, sample / "nih14_sample" / r["image_file"], f"{pid}.png", cls, "rsna"))
  patients = sorted({it[0] for it in items})
  test_patients = set(patients[::4])
  lines = {"train": [], "test": []}
  for pid, src, name, cls, source in items:
    part = "test" if pid in test_patients else "train"
    dst = root / part / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    lines[part].append((pid, name, cls, source))
  for part, rows in lines.items():
    (root / f"{part}_COVIDx_CXR-3A.txt").write_text("".join(" ".join(r) + "\n" for r in rows))
    (root / f"{part}.txt").write_text(
      "".join(
        f"{p} {n} {'positive' if c == 'COVID-19' else 'negative'} {s}\n" for p, n, c, s in rows
      )
    )
  return root
