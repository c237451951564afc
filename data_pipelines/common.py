"""What the corpus builders share: configs with an image size, patient splits, skip counting,
CSV reading, report section parsing and a base builder that decodes images in worker processes.

A builder subclasses `CorpusBuilder`, lists its records in `_records(root, split)` (dicts with
an `_image` path, or `_skip` = reason for a record already known to be bad) and turns a record
plus its PNG bytes into an example in `_example(record, png)`. Everything else (resize, worker
pool, skip counts in `info.metadata['skipped']`, the log line) is here. A text-only config
(`image_size` 0) lists records without `_image` and gets b'' for the PNG.
"""

import collections
from collections.abc import Callable, Iterable, Iterator
import csv
import dataclasses
import gzip
import hashlib
import io
import multiprocessing
import os
import re
from typing import Any
import zlib

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
  """A builder config: the stored shorter side (0: a text-only config, no image read) and, for
  CheXpert-style labels, the policy."""

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


def patient_bucket(patient_id: str) -> int:
  """The patient's hash bucket, 0..99: the first 32 bits of sha256(stripped id, UTF-8) mod 100."""
  digest = hashlib.sha256(patient_id.strip().encode("utf-8")).hexdigest()
  return int(digest[:8], 16) % 100


def split_for_patient(patient_id: str, buckets: tuple[tuple[str, int], ...] = SPLIT_BUCKETS) -> str:
  """Deterministic patient-level split: the first (name, upper) of `buckets` (upper bounds in
  increasing order, the last 100) with `patient_bucket(patient_id) < upper`."""
  bucket = patient_bucket(patient_id)
  for name, upper in buckets:
    if bucket < upper:
      return name
  raise AssertionError(bucket)  # Unreachable while the last upper bound is 100.


def chexpert_value(raw: str, policy: str) -> int:
  """One CheXpert cell ('1.0', '0.0', '-1.0', '') -> 1 / 0 / -1 under `policy`."""
  raw = (raw or "").strip()
  if not raw:
    return 0
  value = float(raw)  # ValueError for text; inf, nan and 0.5 are refused below.
  if value == -1:
    return {"ignore": -1, "ones": 1, "zeros": 0}[policy]
  if value not in (0, 1):
    raise ValueError(f"CheXpert label {raw!r}")
  return int(value)


# ----------------------------------------------------------------------------- files


def require(path: epath.Path, what: str) -> epath.Path:
  if not path.exists():
    raise DataError(f"{path}: required file not found ({what})")
  return path


def inside(root: epath.Path, path: epath.Path) -> bool:
  """Whether `path`, with symlinks and `..` resolved, lies inside `root` (resolved too).

  A path that cannot be a file name at all (a NUL byte, too long) is not inside.
  """
  try:
    real_root = os.path.realpath(os.fspath(root))
    real = os.path.realpath(os.fspath(path))
  except (ValueError, OSError):
    return False
  return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def safe_path(root: epath.Path, *parts: str) -> epath.Path | None:
  """root / parts if the result resolves inside root (see `inside`), else None."""
  try:
    path = root.joinpath(*parts)
  except (ValueError, TypeError):
    return None
  return path if inside(root, path) else None


def _utf8(data: bytes, path: epath.Path, *, bom: bool = True) -> str:
  """The file's text; DataError naming the file, line and byte if it is not UTF-8."""
  try:
    return data.decode("utf-8-sig" if bom else "utf-8")
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    raise DataError(
      f"{path}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8; re-save the file as UTF-8"
    ) from None


def read_bytes(path: epath.Path, manifest: "Manifest | None" = None) -> bytes:
  """The bytes of a required manifest file (gunzipped for .gz); one DataError otherwise."""
  require(path, "manifest")
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({type(e).__name__}: {e.strerror or e})") from None
  if manifest is not None:
    manifest.add(path, raw)
  if path.name.endswith(".gz"):
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{path}: not a readable gzip file ({type(e).__name__})") from None
  return raw


def read_text(path: epath.Path, manifest: "Manifest | None" = None) -> str:
  """A required text file (a split list, a label file) as UTF-8; one DataError otherwise."""
  return _utf8(read_bytes(path, manifest), path)


class Row(dict):
  """A CSV row (column -> cell) that knows where it is: `where` = '<file>:<line>'."""

  where: str = ""


def read_csv(
  path: epath.Path,
  required_columns: Iterable[str],
  *,
  delimiter: str = ",",
  fieldnames: list[str] | None = None,
  skip: Callable[[str, str], None] | None = None,
  manifest: "Manifest | None" = None,
) -> list[Row]:
  """Rows of a (possibly .gz) CSV, each a `Row` naming its file and line.

  A missing file or column, a byte that is not UTF-8, a gzip or CSV format error: one
  DataError naming the file (and line). A row with fewer or more cells than the header is
  passed to `skip('malformed_row', where)` and left out (a DataError if `skip` is None).
  """
  text = _utf8(read_bytes(path, manifest), path)
  reader = csv.DictReader(
    io.StringIO(text, newline=""), delimiter=delimiter, fieldnames=fieldnames, restval=None
  )
  rows: list[Row] = []
  try:
    header = reader.fieldnames or []
    missing = [c for c in required_columns if c not in header]
    if missing:
      has = ", ".join(h if h.isprintable() else repr(h) for h in header)
      raise DataError(f"{path}: missing column(s) {', '.join(missing)} (has {has})")
    for cells in reader:
      row = Row(cells)
      row.where = f"{path.name}:{reader.line_num}"
      if None in row or None in row.values():
        if skip is None:
          raise DataError(f"{row.where}: {len(header)} columns in the header, not in this row")
        skip("malformed_row", row.where)
        continue
      rows.append(row)
  except csv.Error as e:
    raise DataError(f"{path}: line {reader.line_num}: {e}") from None
  return rows


class Manifest:
  """The files a build read (CSVs, lists, report XML), fingerprinted for `corpora.source_changes`.

  Stored in `info.metadata['source']`: the manual_dir and, per file (relative to it), its
  size, mtime (ns) and sha256. A load compares size and mtime first and hashes only a file whose
  stat changed, so a copied but identical source is not reported.
  """

  def __init__(self, root: epath.Path):
    self.root = epath.Path(os.path.realpath(os.fspath(root)))
    self.files: dict[str, list[Any]] = {}

  def add(self, path: epath.Path, data: bytes) -> None:
    real = os.path.realpath(os.fspath(path))
    try:
      rel = os.path.relpath(real, os.fspath(self.root))
      st = os.stat(real)
    except (OSError, ValueError):
      return
    self.files[rel] = [st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest()]

  def metadata(self) -> dict[str, Any]:
    return {"manual_dir": os.fspath(self.root), "files": dict(sorted(self.files.items()))}


def skipped_line(skipped: dict[str, int]) -> str:
  """'skipped 5 rows: 3 duplicate_key, 2 unreadable_image' (or 'skipped 0 rows')."""
  total = sum(skipped.values())
  parts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda x: -x[1]))
  return f"skipped {total} rows" + (f": {parts}" if parts else "")


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
    root = epath.Path(root)
    self._skipped = collections.Counter()
    self.manifest = Manifest(root)
    by_split = self._split_records(root)
    check_records(by_split, root)
    self.info.metadata["source"] = self.manifest.metadata()
    # A split with no usable record is left out (tfds cannot write an empty split); its bad
    # records are counted here.
    generators = {}
    for name in self.SPLITS:
      records = by_split.get(name, [])
      if any("_skip" not in r for r in records):
        generators[name] = self._generate_examples(records, name)
      else:
        for record in records:
          self.skip(*record["_skip"])
    self.info.metadata["skipped"] = dict(sorted(self._skipped.items()))
    return generators

  # Readers of manual_dir files: one-line DataErrors, malformed rows counted, files fingerprinted.
  def csv(self, path: epath.Path, required_columns: Iterable[str], **kw) -> list[Row]:
    return read_csv(path, required_columns, skip=self.skip, manifest=self.manifest, **kw)

  def text(self, path: epath.Path) -> str:
    return read_text(path, self.manifest)

  def skip(self, reason: str, where: str) -> None:
    """Counts a skipped record. `where` names its file and line or key: never report text or a
    patient id (the log is kept with the run)."""
    self._skipped[reason] += 1
    logging.warning("%s/%s: skipping %s (%s)", self.name, self.builder_config.name, where, reason)

  def _images(self, records: list[dict[str, Any]]) -> Iterator[tuple[int, bytes | None, str]]:
    """(index, PNG bytes or None, error) of each record not skipped, in record order. A
    text-only config (`image_size` 0) reads no image: b'' for each."""
    size = self.builder_config.image_size
    if not size:
      yield from ((i, b"", "") for i, r in enumerate(records) if "_skip" not in r)
      return
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
        # `error` is the exception type only: PIL/pydicom messages repeat the file path.
        self.skip("unreadable_image", f"{record['_where']}: {error}")
        continue
      kept += 1
      yield record["_key"], self._example(record, png)
    self.info.metadata["skipped"] = dict(sorted(self._skipped.items()))
    logging.info("%s/%s: split %s: %d examples", self.name, self.builder_config.name, split, kept)

  def _post_download_and_prepare_hook(self) -> None:
    skipped = dict(self.info.metadata.get("skipped", {}))
    logging.info(
      "%s/%s: built %s; %s",
      self.name,
      self.builder_config.name,
      {k: v.num_examples for k, v in self.info.splits.items()},
      skipped_line(skipped),
    )


def check_records(by_split: dict[str, list[dict[str, Any]]], root: epath.Path) -> None:
  """Marks, across all splits, a repeated `_key` ('duplicate_key': the first record is kept)
  and an `_image` that resolves outside `root` ('outside_manual_dir': a symlink or `..`)."""
  seen: set[str] = set()
  for records in by_split.values():
    for record in records:
      if "_skip" in record:
        continue
      where = record.get("_where", "")
      if record["_key"] in seen:
        record["_skip"] = ("duplicate_key", where)
      elif "_image" in record and not inside(root, record["_image"]):
        record["_skip"] = ("outside_manual_dir", where)
      else:
        seen.add(record["_key"])


def text_record(findings: str, impression: str, text: str) -> tuple[dict[str, Any], str]:
  """The text features of a report, or ({}, reason) when it has no usable text."""
  if not text.strip():
    return {}, "empty_text"
  sentences = sentences_lib.split_sentences(text)
  if not sentences:
    return {}, "no_sentences"
  return {"findings": findings, "impression": impression, "text": text, "sentences": sentences}, ""
