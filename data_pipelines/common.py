"""What the corpus builders share: configs with an image size, patient splits, skip counting,
CSV reading, report section parsing and a base builder that decodes images in worker processes.

A builder subclasses `CorpusBuilder`, lists its records in `_records(root, split)` (dicts with
an `_image` path, or `_skip` = reason for a record already known to be bad) and turns a record
plus its PNG bytes into an example in `_example(record, png)`. Everything else (resize, worker
pool, skip counts in `info.metadata['skipped']`, the log line) is here.
"""

import collections
from collections.abc import Iterable, Iterator
import csv
import dataclasses
import gzip
import hashlib
import io
import multiprocessing
import re
from typing import Any

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import imaging
from data_pipelines import sentences as sentences_lib
from medvl_jax.errors import DataError

DEFAULT_IMAGE_SIZE = 256
# Shorter sides with a predefined config: `<base>` is 256, `<base>_<size>` the others.
IMAGE_SIZES = (64, 128, 224, 256, 320, 384, 512, 1024)
# Patient-hash buckets out of 100 for corpora without an official split (same rule as
# `cxr_sample`): [0, 80) train, [80, 90) validation, [90, 100) test.
SPLIT_BUCKETS = (("train", 80), ("validation", 90), ("test", 100))

# The 14 CheXpert observations, in the CheXpert CSV column order (also MIMIC-CXR-JPG's
# `-chexpert.csv.gz` and the Open-i MeSH-derived labels).
CHEXPERT_LABELS = (
  "No Finding",
  "Enlarged Cardiomediastinum",
  "Cardiomegaly",
  "Lung Opacity",
  "Lung Lesion",
  "Edema",
  "Consolidation",
  "Pneumonia",
  "Atelectasis",
  "Pneumothorax",
  "Pleural Effusion",
  "Pleural Other",
  "Fracture",
  "Support Devices",
)
# Policies for an uncertain (-1) CheXpert label (Irvin et al. 2019): keep -1 for the consumer
# to mask ("ignore"), or map it to 1 ("ones") or 0 ("zeros"). A blank label is 0.
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
  """A builder config: the stored shorter side and, for CheXpert-style labels, the policy."""

  image_size: int = DEFAULT_IMAGE_SIZE
  uncertain: str = "ignore"


def make_configs(bases: Iterable[tuple[str, str, dict[str, Any]]]) -> list[CorpusConfig]:
  """For each (name, description, kwargs): `name` at 256 px and `name_<size>` at the others."""
  configs = []
  for name, description, kwargs in bases:
    for size in IMAGE_SIZES:
      suffix = "" if size == DEFAULT_IMAGE_SIZE else f"_{size}"
      configs.append(
        CorpusConfig(
          name=name + suffix,
          image_size=size,
          description=f"{description} Shorter side {size}.",
          **kwargs,
        )
      )
  return configs


def config_name(base: str, image_size: int) -> str:
  if image_size not in IMAGE_SIZES:
    raise DataError(
      f"image_size={image_size} has no config; valid: {', '.join(map(str, IMAGE_SIZES))}"
    )
  return base if image_size == DEFAULT_IMAGE_SIZE else f"{base}_{image_size}"


def split_for_patient(patient_id: str) -> str:
  """Deterministic patient-level split: sha256 of the id mapped to 100 buckets."""
  digest = hashlib.sha256(patient_id.strip().encode("utf-8")).hexdigest()
  bucket = int(digest[:8], 16) % 100
  for name, upper in SPLIT_BUCKETS:
    if bucket < upper:
      return name
  raise AssertionError(bucket)  # Unreachable.


def chexpert_value(raw: str, policy: str) -> int:
  """One CheXpert cell ('1.0', '0.0', '-1.0', '') -> 1 / 0 / -1 under `policy`."""
  raw = (raw or "").strip()
  if not raw:
    return 0
  value = int(float(raw))
  if value == -1:
    return {"ignore": -1, "ones": 1, "zeros": 0}[policy]
  if value not in (0, 1):
    raise ValueError(f"CheXpert label {raw!r}")
  return value


# ----------------------------------------------------------------------------- files


def require(path: epath.Path, what: str) -> epath.Path:
  if not path.exists():
    raise DataError(f"{path}: required file not found ({what})")
  return path


def read_csv(
  path: epath.Path,
  required_columns: Iterable[str],
  *,
  delimiter: str = ",",
  fieldnames: list[str] | None = None,
) -> list[dict[str, str]]:
  """Rows of a (possibly .gz) CSV; a missing file or column is one DataError naming it."""
  require(path, "CSV")
  data = path.read_bytes()
  if path.name.endswith(".gz"):
    data = gzip.decompress(data)
  reader = csv.DictReader(
    io.StringIO(data.decode("utf-8-sig"), newline=""), delimiter=delimiter, fieldnames=fieldnames
  )
  rows = list(reader)
  missing = [c for c in required_columns if c not in (reader.fieldnames or [])]
  if missing:
    raise DataError(
      f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(reader.fieldnames or [])})"
    )
  return rows


# ----------------------------------------------------------------------------- reports

# A section header: an upper-case phrase at the start of a line, then a colon
# ("FINDINGS:", "FINDINGS AND IMPRESSION:", "PA AND LATERAL CHEST RADIOGRAPH:").
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 /&(),'-]{1,60}?)[ \t]*:", re.MULTILINE)
FINDINGS_HEADERS = ("FINDINGS", "FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION", "FINDING")
IMPRESSION_HEADERS = ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "SUMMARY")
# Sections that describe the request, not the image: never used as report text.
_CONTEXT_HEADERS = frozenset(
  {
    "EXAMINATION",
    "EXAM",
    "INDICATION",
    "INDICATIONS",
    "HISTORY",
    "CLINICAL HISTORY",
    "REASON FOR EXAM",
    "REASON FOR EXAMINATION",
    "TECHNIQUE",
    "COMPARISON",
    "COMPARISONS",
    "PROCEDURE",
    "TYPE OF EXAMINATION",
    "CLINICAL INFORMATION",
    "WET READ",
    "NOTIFICATION",
    "RECOMMENDATION",
    "RECOMMENDATIONS",
    "ADDENDUM",
    "PROVIDER",
    "REFERRING PHYSICIAN",
  }
)


def _clean(text: str) -> str:
  return sentences_lib.normalize(text)


def parse_sections(report: str) -> dict[str, str]:
  """Splits a free-text report at its upper-case "HEADER:" lines.

  Returns:
    Upper-case header -> whitespace-normalised body, in report order; text before the first
    header is under "" (e.g. MIMIC's "FINAL REPORT" banner). A repeated header keeps the
    bodies joined by a space.
  """
  sections: dict[str, str] = {}
  matches = list(_HEADER.finditer(report))
  bounds = [("", 0, matches[0].start() if matches else len(report))]
  for i, m in enumerate(matches):
    end = matches[i + 1].start() if i + 1 < len(matches) else len(report)
    bounds.append((re.sub(r"\s+", " ", m.group(1)).strip(), m.end(), end))
  for name, start, end in bounds:
    body = _clean(report[start:end])
    if name == "" and body.upper() == "FINAL REPORT":
      body = ""
    if body:
      sections[name] = f"{sections[name]} {body}" if name in sections else body
  return sections


def report_fields(report: str) -> tuple[str, str, str]:
  """(findings, impression, text) of a free-text report.

  text is findings + impression when either exists; otherwise (no FINDINGS/IMPRESSION header)
  the fallback is every section that is not request context (indication, history, technique,
  comparison...), and failing that the last paragraph of the report. '' only for an empty one.
  """
  sections = parse_sections(report)
  findings = " ".join(sections[h] for h in FINDINGS_HEADERS if h in sections)
  impression = " ".join(sections[h] for h in IMPRESSION_HEADERS if h in sections)
  text = " ".join(t for t in (findings, impression) if t)
  if not text:
    text = " ".join(
      body
      for name, body in sections.items()
      if name not in _CONTEXT_HEADERS and body.upper() != "FINAL REPORT"
    )
  if not text:
    paragraphs = [_clean(_HEADER.sub(" ", p)) for p in re.split(r"\n\s*\n", report)]
    paragraphs = [p for p in paragraphs if p and p.upper() != "FINAL REPORT"]
    text = paragraphs[-1] if paragraphs else ""
  return findings, impression, text


# ----------------------------------------------------------------------------- features


def image_feature() -> tfds.features.Image:
  return tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png")


def labels_feature(n: int) -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(n,), dtype=np.int32)


def text_features() -> dict[str, tfds.features.FeatureConnector]:
  return {
    "findings": tfds.features.Text(),
    "impression": tfds.features.Text(),
    "text": tfds.features.Text(),
    "sentences": tfds.features.Sequence(tfds.features.Text()),
  }


# ----------------------------------------------------------------------------- builder


class CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the corpus builders: manual_dir in, resized grayscale PNGs out, skips counted."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  SPLITS: tuple[str, ...] = ("train", "validation", "test")
  # Worker processes for image decode/resize (1 = in this process). The prepare CLI sets it.
  num_workers: int = 1

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 computes this through the `importlib_resources` backport, which is not
    # installed on Python >= 3.9; the module file is what it would return.
    import inspect  # pylint: disable=g-import-not-at-top

    return epath.Path(inspect.getfile(cls))

  # --- to implement
  def _features(self) -> dict[str, Any]:
    raise NotImplementedError

  def _split_records(self, root: epath.Path) -> dict[str, list[dict[str, Any]]]:
    """split -> records; a record has `_key`, `_image` (path) or `_skip` (reason, detail)."""
    raise NotImplementedError

  def _example(self, record: dict[str, Any], png: bytes) -> dict[str, Any]:
    raise NotImplementedError

  # --- shared
  def _info(self) -> tfds.core.DatasetInfo:
    # Description and citation: the README.md (dataset card) and CITATIONS.bib beside the
    # builder module, which tfds reads through `code_path`.
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(self._features()), metadata=tfds.core.MetadataDict()
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      root = dl_manager.manual_dir
    except AssertionError as e:  # tfds: "Manual directory <path> does not exist or is empty."
      raise DataError(f"{self.name}: {str(e).splitlines()[0]}") from e
    self._skipped = collections.Counter()
    by_split = self._split_records(epath.Path(root))
    # A split with no usable record is left out (tfds cannot write an empty split).
    return {
      name: self._generate_examples(by_split[name], name)
      for name in self.SPLITS
      if any("_skip" not in r for r in by_split.get(name, []))
    }

  def skip(self, reason: str, detail: str) -> None:
    self._skipped[reason] += 1
    logging.warning("%s/%s: skipping %s (%s)", self.name, self.builder_config.name, detail, reason)

  def _images(self, records: list[dict[str, Any]]) -> Iterator[tuple[int, bytes | None, str]]:
    size = self.builder_config.image_size
    tasks = [(i, str(r["_image"]), size) for i, r in enumerate(records) if "_skip" not in r]
    if self.num_workers <= 1 or len(tasks) < 2:
      yield from map(self._load_task, tasks)
      return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data_pipelines.imaging"])
    with ctx.Pool(self.num_workers) as pool:
      yield from pool.imap(self._load_task_fn(), tasks, chunksize=8)

  def _load_task_fn(self):
    return imaging.load_task

  def _load_task(self, task):
    return self._load_task_fn()(task)

  def _generate_examples(self, records, split) -> Iterator[tuple[str, dict[str, Any]]]:
    kept = 0
    for record in records:
      if "_skip" in record:
        self.skip(*record["_skip"])
    loaded = self._images(records)
    for i, png, error in loaded:
      record = records[i]
      if png is None:
        self.skip("unreadable_image", f"{record['_image']}: {error}")
        continue
      kept += 1
      yield record["_key"], self._example(record, png)
    self.info.metadata["skipped"] = dict(sorted(self._skipped.items()))
    logging.info("%s/%s: split %s: %d examples", self.name, self.builder_config.name, split, kept)

  def _post_download_and_prepare_hook(self) -> None:
    skipped = dict(self.info.metadata.get("skipped", {}))
    logging.info(
      "%s/%s: built %s; skipped %d bad records %s",
      self.name,
      self.builder_config.name,
      {k: v.num_examples for k, v in self.info.splits.items()},
      sum(skipped.values()),
      skipped,
    )


def text_record(findings: str, impression: str, text: str) -> tuple[dict[str, Any], str]:
  """The text features of a report, or ({}, reason) when it has no usable text."""
  if not text.strip():
    return {}, "empty_text"
  sentences = sentences_lib.split_sentences(text)
  if not sentences:
    return {}, "no_sentences"
  return {"findings": findings, "impression": impression, "text": text, "sentences": sentences}, ""
