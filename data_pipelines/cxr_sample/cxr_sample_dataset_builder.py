"""tfds builder for the bundled real sample (`../shared/data`, see its README).

Configs:
  paired:    `covid_cxr_notes/` chest X-ray PNGs with their clinical notes.
  text_only: `iu_reports/iu_reports_2000.csv` IU/Open-i radiology reports (no images).
  image_only: `nih14_sample/` NIH ChestX-ray14 images with their 14 finding labels + No Finding
             (multi-hot `labels`, in the order of NIH_LABELS; no text).
  nih_halves: the rows, features and skips of `image_only`, split into two patient-disjoint
             halves instead: `pretrain` (an image-only pretraining source) and `probe` (the
             images a linear probe evaluates on, which that pretraining never saw).

The data is read from `dl_manager.manual_dir`, which must be the sample folder itself:

  builder = Builder(config='paired', data_dir=...)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=SAMPLE_DIR, try_download_gcs=False))

Splits are by patient (a hash of the patient id, so no patient is in two splits; each IU
report counts as its own patient): `train` / `validation` / `test` (SPLIT_BUCKETS), except
`nih_halves`: `pretrain` / `probe` (NIH_HALVES). The training input and the evaluators read
each split by random access from an ArrayRecord copy written once beside the tfds files
(`medvl_jax/data/records.py`). Bad records are skipped and counted per reason; the counts are
logged and stored in `builder.info.metadata['skipped']`.
"""

import collections
from collections.abc import Iterator
import io
import struct
from typing import Any

from absl import logging
from etils import epath
import numpy as np
from PIL import Image as PILImage
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines import sentences as sentences_lib
from data_pipelines.common import SPLIT_BUCKETS, split_for_patient  # one rule, all corpora
from medvl_jax.errors import DataError

PAIRED_CSV = "covid_cxr_notes/pairs.csv"
IU_CSV = "iu_reports/iu_reports_2000.csv"
NIH_CSV = "nih14_sample/labels.csv"
# The NIH ChestX-ray14 finding columns of labels.csv, in the order of the `labels` feature.
NIH_LABELS = (
  "Atelectasis",
  "Cardiomegaly",
  "Consolidation",
  "Edema",
  "Effusion",
  "Emphysema",
  "Fibrosis",
  "Hernia",
  "Infiltration",
  "Mass",
  "Nodule",
  "Pleural_Thickening",
  "Pneumonia",
  "Pneumothorax",
  "No Finding",
)
# Patient-hash buckets out of 100 (`common.patient_bucket`): NIH_HALVES for `nih_halves`,
# [0, 50) pretrain, [50, 100) probe; SPLIT_BUCKETS for the other configs, [0, 80) train,
# [80, 90) validation, [90, 100) test. So `pretrain` lies inside image_only's `train`, and
# `probe` holds all of image_only's `validation` and `test`.
NIH_HALVES = (("pretrain", 50), ("probe", 100))
_CITATION = """\
@article{cohen2020covid, title={COVID-19 Image Data Collection: Prospective Predictions Are
  the Future}, author={Cohen, Joseph Paul and Morrison, Paul and Dao, Lan and Roth, Karsten
  and Duong, Tim Q and Ghassemi, Marzyeh}, journal={arXiv 2006.11988}, year={2020}}
@article{demner2016preparing, title={Preparing a collection of radiology examinations for
  distribution and retrieval}, author={Demner-Fushman, Dina and others},
  journal={JAMIA}, volume={23}, number={2}, pages={304--310}, year={2016}}
"""


def strip_iccp(png: bytes) -> bytes:
  """Drops iCCP chunks (lossless): libpng warns on every decode of an RGB profile in a gray
  PNG, which would flood training logs."""
  out, pos = [png[:8]], 8
  while pos + 8 <= len(png):
    length = struct.unpack(">I", png[pos : pos + 4])[0]
    end = pos + 12 + length
    if png[pos + 4 : pos + 8] != b"iCCP":
      out.append(png[pos:end])
    pos = end
  return b"".join(out)


def read_grayscale_png(path) -> bytes:
  """Returns the file as 8-bit grayscale PNG bytes (as stored, less iCCP, if it is one).

  Raises:
    OSError / ValueError (from PIL) if the file cannot be decoded.
  """
  data = path.read_bytes()
  with PILImage.open(io.BytesIO(data)) as img:
    img.load()  # Full decode: catches truncated or corrupt files.
    if img.format == "PNG" and img.mode == "L":
      return strip_iccp(data) if "icc_profile" in img.info else data
    if img.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit or float: rescale to 8 bits.
      arr = np.asarray(img, dtype=np.float32)
      arr = arr * (255.0 / max(float(arr.max()), 1.0))
      img = PILImage.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    else:
      img = img.convert("L")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


# Configs that read `nih14_sample/` (same rows, features and skips; only the splits differ).
NIH_CONFIGS = ("image_only", "nih_halves")
_NIH_COLUMNS = ("image_file", "image_index", "patient_id", "view_position", *NIH_LABELS)
# The columns each config reads.
COLUMNS = {
  "paired": ("image_file", "patientid", "clinical_notes", "finding", "view"),
  "text_only": ("report_id", "findings", "impression", "is_normal"),
  **{config: _NIH_COLUMNS for config in NIH_CONFIGS},
}


class Builder(tfds.core.GeneratorBasedBuilder):
  """The bundled real chest X-ray sample: paired image-note data and text-only reports."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "image_only config (nih14_sample).",
    "1.2.0": "nih_halves config: nih14_sample split by patient into pretrain and probe halves; "
    "the other configs build the same examples as in 1.1.0.",
  }
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(
      name="paired", description="covid_cxr_notes: CXR images with clinical notes."
    ),
    tfds.core.BuilderConfig(
      name="text_only", description="iu_reports: IU/Open-i radiology reports, no images."
    ),
    tfds.core.BuilderConfig(
      name="image_only",
      description="nih14_sample: NIH ChestX-ray14 images with 14 labels + No Finding.",
    ),
    tfds.core.BuilderConfig(
      name="nih_halves",
      description="nih14_sample as image_only, split by patient hash into pretrain (buckets "
      "0-49) and probe (50-99) halves.",
    ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Pass the sample folder (holding covid_cxr_notes/ and iu_reports/, normally "
    "../shared/data beside the repo or $MEDVL_SAMPLE_DIR) as manual_dir."
  )

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 computes this through the `importlib_resources` backport, which is not
    # installed on Python >= 3.9; the module file is what it would return.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    if self.builder_config.name == "paired":
      features = {
        "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
        "image_id": tfds.features.Text(),
        "text": tfds.features.Text(),
        "sentences": tfds.features.Sequence(tfds.features.Text()),
        "finding": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "view": tfds.features.Text(),
      }
    elif self.builder_config.name in NIH_CONFIGS:
      features = {
        "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
        "image_id": tfds.features.Text(),
        "labels": tfds.features.Tensor(shape=(len(NIH_LABELS),), dtype=np.int32),
        "patient_id": tfds.features.Text(),
        "view": tfds.features.Text(),
      }
    else:
      features = {
        "report_id": tfds.features.Text(),
        "findings": tfds.features.Text(),
        "impression": tfds.features.Text(),
        "text": tfds.features.Text(),
        "sentences": tfds.features.Sequence(tfds.features.Text()),
        "is_normal": tfds.features.Scalar(dtype=np.int32),
      }
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(features),
      metadata=tfds.core.MetadataDict(),
      citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      root = dl_manager.manual_dir
    except AssertionError as e:  # tfds: "Manual directory <path> does not exist or is empty."
      raise DataError(f"cxr_sample: {str(e).splitlines()[0]}") from e
    root = epath.Path(root)
    self._skipped = collections.Counter()
    self._seen: set[str] = set()
    self.manifest = common.Manifest(root)
    config = self.builder_config.name
    csv_path, patient_key = {
      "paired": (PAIRED_CSV, "patientid"),
      "image_only": (NIH_CSV, "patient_id"),
      "nih_halves": (NIH_CSV, "patient_id"),
      "text_only": (IU_CSV, "report_id"),
    }[config]
    if not (root / csv_path).exists():
      raise DataError(
        f"{root / csv_path}: sample CSV not found (manual_dir must be the sample folder "
        "holding covid_cxr_notes/ and iu_reports/)"
      )
    rows = common.read_csv(
      root / csv_path, COLUMNS[config], skip=self._skip, manifest=self.manifest
    )
    self.info.metadata["source"] = self.manifest.metadata()
    buckets = NIH_HALVES if config == "nih_halves" else SPLIT_BUCKETS
    by_split = collections.defaultdict(list)
    for row in rows:
      by_split[split_for_patient(row[patient_key], buckets)].append(row)
    return {name: self._generate_examples(root, by_split[name], name) for name, _ in buckets}

  def _generate_examples(self, root, rows, split):
    if self.builder_config.name == "paired":
      return self._paired_examples(root, rows, split)
    if self.builder_config.name in NIH_CONFIGS:
      return self._image_only_examples(root, rows, split)
    return self._text_only_examples(root, rows, split)

  def _skip(self, reason: str, where: str) -> None:
    """Counts a skipped row; `where` is '<csv>:<line>', never note text or a patient id."""
    self._skipped[reason] += 1
    logging.warning("cxr_sample/%s: skipping %s (%s)", self.builder_config.name, where, reason)

  def _first(self, key: str, where: str) -> bool:
    """False (and a counted `duplicate_key` skip) for a key already written in any split: tfds
    would stop with an AssertionError that logs both examples, text and patient id included."""
    if key in self._seen:
      self._skip("duplicate_key", where)
      return False
    self._seen.add(key)
    return True

  def _image(self, root, folder: str, rel: str, where: str) -> bytes | None:
    """The row's image as grayscale PNG bytes, or None after a counted skip."""
    path = common.safe_path(root, folder, rel)
    if path is None:
      self._skip("outside_manual_dir", where)
      return None
    if not path.exists():
      self._skip("missing_image", where)
      return None
    try:
      return read_grayscale_png(path)
    except (OSError, ValueError, SyntaxError, EOFError, PILImage.DecompressionBombError) as e:
      self._skip("unreadable_image", f"{where}: {type(e).__name__}")
      return None

  def _finish_split(self, split: str, kept: int) -> None:
    self.info.metadata["skipped"] = dict(sorted(self._skipped.items()))
    logging.info("cxr_sample/%s: split %s: %d examples", self.builder_config.name, split, kept)

  def _paired_examples(self, root, rows, split) -> Iterator[tuple[str, dict[str, Any]]]:
    kept = 0
    for row in rows:
      image_id = row["image_file"].rsplit("/", 1)[-1]
      where = f"{row.where} (image {image_id[:64]!r})"
      text = row["clinical_notes"].strip()
      if not text:
        self._skip("empty_text", where)
        continue
      sentences = sentences_lib.split_sentences(text)
      if not sentences:
        self._skip("no_sentences", where)
        continue
      if image_id in self._seen:
        self._skip("duplicate_key", where)
        continue
      image = self._image(root, "covid_cxr_notes", row["image_file"], where)
      if image is None or not self._first(image_id, where):
        continue
      kept += 1
      yield (
        image_id,
        {
          "image": image,
          "image_id": image_id,
          "text": text,
          "sentences": sentences,
          "finding": row["finding"].strip(),
          "patient_id": row["patientid"].strip(),
          "view": row["view"].strip(),
        },
      )
    self._finish_split(split, kept)

  def _image_only_examples(self, root, rows, split) -> Iterator[tuple[str, dict[str, Any]]]:
    kept = 0
    for row in rows:
      # NIH image names start with the patient number: logs name the CSV line only.
      image_id, where = row["image_index"].strip(), row.where
      try:
        labels = [int(row[name]) for name in NIH_LABELS]
      except ValueError:
        self._skip("bad_labels", where)
        continue
      if any(v not in (0, 1) for v in labels):
        self._skip("bad_labels", where)
        continue
      if image_id in self._seen:
        self._skip("duplicate_key", where)
        continue
      image = self._image(root, "nih14_sample", row["image_file"], where)
      if image is None or not self._first(image_id, where):
        continue
      kept += 1
      yield (
        image_id,
        {
          "image": image,
          "image_id": image_id,
          "labels": np.asarray(labels, np.int32),
          "patient_id": row["patient_id"].strip(),
          "view": row["view_position"].strip(),
        },
      )
    self._finish_split(split, kept)

  def _text_only_examples(self, root, rows, split) -> Iterator[tuple[str, dict[str, Any]]]:
    del root  # Text only.
    kept = 0
    for row in rows:
      report_id = row["report_id"].strip()
      where = f"{row.where} (report {report_id[:64]!r})"
      findings, impression = row["findings"].strip(), row["impression"].strip()
      text = " ".join(t for t in (findings, impression) if t)
      if not text:
        self._skip("empty_text", where)
        continue
      sentences = sentences_lib.split_sentences(findings) + sentences_lib.split_sentences(
        impression
      )
      if not sentences:
        self._skip("no_sentences", where)
        continue
      try:
        is_normal = int(row["is_normal"] or 0)
      except ValueError:
        self._skip("bad_labels", where)
        continue
      if not self._first(report_id, where):
        continue
      kept += 1
      yield (
        report_id,
        {
          "report_id": report_id,
          "findings": findings,
          "impression": impression,
          "text": text,
          "sentences": sentences,
          "is_normal": is_normal,
        },
      )
    self._finish_split(split, kept)

  def _post_download_and_prepare_hook(self) -> None:
    skipped = dict(self.info.metadata.get("skipped", {}))
    logging.info(
      "cxr_sample/%s: built %s; %s",
      self.builder_config.name,
      {k: v.num_examples for k, v in self.info.splits.items()},
      common.skipped_line(skipped),
    )
