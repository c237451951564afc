"""The one dataset registry: every corpus the trainer, the in-loop eval, the evaluators and
`python -m data_pipelines.prepare` read by name.

  corpus = corpora.get("chexpert")            # Corpus: builder module, labels, task type, ...
  b = corpora.builder("chexpert", "u_ignore_64", data_dir=...)   # a tfds builder instance
  corpora.kinds("cxr_sample", "text_only")    # frozenset({'text'})
  corpora.kinds("openi", "reports")           # frozenset({'text'}): the 3,955 Open-i reports

A corpus's builder lives in `data_pipelines/<module>`; it is imported by name only when a
builder is needed, so importing this module imports no data pipeline (nor TensorFlow).
`kinds` is decided from the builder's declared features (its `_info()`), without reading or
preparing data: 'paired' needs the image and the text feature, 'image' the image, 'text' the
sentences.

To add a corpus: write its tfds builder under `data_pipelines/<name>/` and add one `Corpus`
entry to `CORPORA` below (see data_pipelines/README.md, "Adding a corpus").
"""

from collections.abc import Callable
import dataclasses
import functools
import hashlib
import importlib
import os
import tempfile
from typing import Any

from absl import logging

from medvl_jax.errors import ConfigError

KINDS = ("paired", "image", "text")
TASK_TYPES = ("multilabel", "multiclass")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """How to find, build and read one registered corpus."""

  name: str  # Registry name (config.data.name, an evaluator's `dataset`, prepare's argument).
  tfds_name: str  # The name its tfds builder registers.
  module: str  # Importing it registers the builder; it exports the class as `Builder`.
  default_config: str  # The builder config used when none is given.
  image_key: str = "image"  # Feature holding the image ('' = the corpus has none).
  text_key: str = ""  # Feature holding the report sentences ('' = the corpus has none).
  label_names: Callable[[], tuple[str, ...]] | None = None  # Columns of `labels` (lazy).
  task_type: str | None = None  # 'multilabel' | 'multiclass' for labelled corpora.
  auto_prepare: bool = False  # Built from the bundled sample on first use.


# Label names import their builder module, so they are looked up only when asked for.
def _chexpert_labels() -> tuple[str, ...]:
  return tuple(importlib.import_module("data_pipelines.common").CHEXPERT_LABELS)


def _nih_labels() -> tuple[str, ...]:
  return tuple(importlib.import_module("data_pipelines.nih14.nih14_dataset_builder").NIH_LABELS)


def _covidx_labels() -> tuple[str, ...]:
  return tuple(importlib.import_module("data_pipelines.covidx.covidx_dataset_builder").CLASSES)


def _rsna_labels() -> tuple[str, ...]:
  return ("Pneumonia",)


CORPORA: dict[str, Corpus] = {
  c.name: c
  for c in (
    # The bundled real sample (../shared/data): paired notes, text-only reports, image-only NIH.
    Corpus(
      "cxr_sample",
      "cxr_sample",
      "data_pipelines.cxr_sample",
      "paired",
      text_key="sentences",
      auto_prepare=True,
    ),
    # Corpora prepared with `python -m data_pipelines.prepare NAME --manual_dir=...`.
    Corpus(
      "mimic_cxr",
      "mimic_cxr",
      "data_pipelines.mimic_cxr",
      "paired",
      text_key="sentences",
      label_names=_chexpert_labels,
      task_type="multilabel",
    ),
    # Open-i: `paired` (images + reports) and `reports` (text only, from the report archive).
    Corpus(
      "openi",
      "openi",
      "data_pipelines.openi",
      "paired",
      text_key="sentences",
      label_names=_chexpert_labels,
      task_type="multilabel",
    ),
    # Image + label corpora (no text; for probes, evaluators and image-only sources).
    Corpus(
      "nih14",
      "nih14",
      "data_pipelines.nih14",
      "default",
      label_names=_nih_labels,
      task_type="multilabel",
    ),
    Corpus(
      "chexpert",
      "chexpert",
      "data_pipelines.chexpert",
      "u_ignore",
      label_names=_chexpert_labels,
      task_type="multilabel",
    ),
    Corpus(
      "rsna_pneumonia",
      "rsna_pneumonia",
      "data_pipelines.rsna_pneumonia",
      "default",
      label_names=_rsna_labels,
      task_type="multilabel",
    ),
    Corpus(
      "covidx",
      "covidx",
      "data_pipelines.covidx",
      "default",
      label_names=_covidx_labels,
      task_type="multiclass",
    ),
  )
}


def names() -> tuple[str, ...]:
  return tuple(sorted(CORPORA))


def get(name: str, *, key: str = "dataset") -> Corpus:
  """The registered corpus `name`; ConfigError naming `key` and the valid names otherwise."""
  if name not in CORPORA:
    raise ConfigError(f"{key}={name!r} is not a known dataset; valid: {', '.join(names())}")
  return CORPORA[name]


def builder_cls(name: str) -> type[Any]:
  """The tfds builder class of corpus `name` (imports its module, which registers it)."""
  return importlib.import_module(get(name).module).Builder


def config_names(name: str) -> tuple[str, ...]:
  return tuple(c.name for c in builder_cls(name).BUILDER_CONFIGS)


def check_config(
  name: str, builder_config: str | None = None, *, key: str = "builder_config"
) -> str:
  """The builder config to use (`builder_config` or the default); ConfigError if unknown."""
  corpus = get(name)
  config = builder_config or corpus.default_config
  valid = config_names(name)
  if config not in valid:
    raise ConfigError(
      f"{key}={config!r} is not a config of {corpus.tfds_name}; valid: {', '.join(valid)}"
    )
  return config


def builder(name: str, builder_config: str | None = None, data_dir: str | None = None):
  """A tfds builder instance of corpus `name` (prepared or not: callers decide what to do).

  A prepared one whose source files changed since its build is reported in one warning line
  (`warn_if_source_changed`).
  """
  config = check_config(name, builder_config)
  b = builder_cls(name)(config=config, data_dir=data_dir or None)
  if b.is_prepared():
    warn_if_source_changed(name, b)
  return b


def prepare_command(b, manual_dir: str | None = None) -> str:
  """The command that prepares tfds builder `b`'s dataset, with its random-access copies, in
  `b`'s data dir: `python -m data_pipelines.prepare NAME --config=... --manual_dir=... ...`.

  The manual_dir is `manual_dir`, else the one an earlier build of `b` recorded, else `DIR`.
  """
  name = next((c.name for c in CORPORA.values() if c.tfds_name == b.name), b.name)
  config = b.builder_config.name
  # Config names are '<base>' at the default image size, else '<base>_<size>'
  # (data_pipelines/common.py, config_name).
  base, _, size = config.rpartition("_")
  flags = [f"--config={base}", f"--image_size={size}"] if base and size.isdigit() else []
  flags = flags or [f"--config={config}"]
  if not manual_dir and b.is_prepared():
    manual_dir = (b.info.metadata or {}).get("source", {}).get("manual_dir")
  root = os.fspath(b.data_dir).rsplit("/", 3)[0]  # <root>/<name>/<config>/<version>
  return " ".join(
    ["python -m data_pipelines.prepare", name, *flags, f"--manual_dir={manual_dir or 'DIR'}"]
    + [f"--data_dir={root}"]
  )


def source_changes(b) -> list[str]:
  """The source files of a prepared build that differ from what it was built from.

  The build stores, in `info.metadata['source']`, its manual_dir and each file it read
  (relative path -> size, mtime in ns, sha256). A file whose size and mtime are unchanged
  is taken as unchanged (a stat, no read); one whose stat changed is hashed. Returns
  '<path> (changed)' / '<path> (missing)' entries; [] for an unchanged source, a build
  without the record or a manual_dir that is no longer there (nothing to
  compare against).
  """
  source = b.info.metadata.get("source") if b.info.metadata else None
  if not source or not os.path.isdir(source.get("manual_dir", "")):
    return []
  changes = []
  for rel, (size, mtime_ns, digest) in source.get("files", {}).items():
    path = os.path.join(source["manual_dir"], rel)
    try:
      st = os.stat(path)
      if st.st_size == size and st.st_mtime_ns == mtime_ns:
        continue
      with open(path, "rb") as f:
        same = st.st_size == size and hashlib.file_digest(f, "sha256").hexdigest() == digest
    except OSError:
      changes.append(f"{rel} (missing)")
      continue
    if not same:
      changes.append(f"{rel} (changed)")
  return changes


_WARNED: set[str] = set()


def warn_if_source_changed(name: str, b) -> bool:
  """Logs one warning (once per build dir) if the build's source changed; True if it did.

  A warning, not an error: the build stays a consistent, reproducible dataset (a resumed run
  keeps reading what it started on); the user decides when to rebuild.
  """
  changes = source_changes(b)
  if not changes:
    return False
  if b.data_dir not in _WARNED:
    _WARNED.add(b.data_dir)
    shown = ", ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")
    logging.warning(
      "%s/%s in %s was built from %s, which changed since: %s; rebuild with "
      "`python -m data_pipelines.prepare %s --config=%s --manual_dir=%s --rebuild`",
      name,
      b.builder_config.name,
      b.data_dir,
      b.info.metadata["source"]["manual_dir"],
      shown,
      name,
      b.builder_config.name,
      b.info.metadata["source"]["manual_dir"],
    )
  return True


@functools.cache
def features(name: str, builder_config: str | None = None):
  """The builder's declared `FeaturesDict` for that config; reads no data."""
  config = check_config(name, builder_config)
  # A fresh empty data dir: the features come from the builder's `_info()`, not from files.
  with tempfile.TemporaryDirectory() as empty:
    return builder_cls(name)(config=config, data_dir=empty).info.features


def kinds(name: str, builder_config: str | None = None) -> frozenset[str]:
  """The kinds of source ('paired', 'image', 'text') this corpus/config can serve."""
  corpus = get(name)
  feats = features(name, builder_config)
  has_image = bool(corpus.image_key) and corpus.image_key in feats
  has_text = bool(corpus.text_key) and corpus.text_key in feats
  return frozenset(
    k
    for k, ok in (("paired", has_image and has_text), ("image", has_image), ("text", has_text))
    if ok
  )


def label_names(name: str) -> tuple[str, ...] | None:
  """Column names of the corpus's `labels` feature; None for a corpus without labels."""
  fn = get(name).label_names
  return fn() if fn else None


def task_type(name: str) -> str | None:
  """'multilabel' or 'multiclass' for a labelled corpus; None otherwise."""
  return get(name).task_type
