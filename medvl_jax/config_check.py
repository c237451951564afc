"""The config schema, and every name and nested choice of a training config checked in one pass
before any I/O.

The schema (`SCHEMA`, below): the keys every config defines, which of them a resume may change
(`RESUMABLE_KEYS`, compared by `check_resumable`) and what each checked value must be.

`train.train_and_evaluate` calls `check(config)` first: before the workdir or its config.json
is written, before any dataset is read or built and before any model is initialised. Each
mistake is one `ConfigError` line naming the key and the valid values. Nothing here reads data:
a registry lookup, a builder class (imported by name, its configs listed) and, for a pretrained
text tower, the small `config.json` of its directory.

Checks, in order: the required keys (`check_required`), registry names (model, dataset, loss),
the values of the schema (step counts and other positive integers, lr > 0, weight_decay >= 0,
0 <= loss.lam <= 1, loss.temperature > 0, the schedule, the non-finite policy and the loss
layout), the model's nested choices (dtype, image variant, mean/std, checkpoint paths), the data
section (builder config, what the dataset can serve, sizes), the batch layout (accumulation) and
each evaluator's name and settings (against the evaluator constructor's signature, without
building it).

The preflight of a training run (`train.train_and_evaluate`, before any data is built or
anything is compiled) adds what needs the filesystem, each failure one line:
`check_resumable` (the config fits the run already in the workdir), `check_workdir`
(creatable, writable, not a file; a URL's bucket reachable), `check_disk` (free space for two
checkpoints, estimated from the state's bytes; local disks only), `check_batch_fits`
(batch_size <= each train split, read from the prepared dataset's metadata, unless
data.allow_repeats).
"""

import json
import math
import os
import pathlib
import shutil
from typing import Any

from absl import logging
import ml_collections

from medvl_jax import families, paths
from medvl_jax.ckpt import checkpoint, run_dir
from medvl_jax.data import corpora, sources
from medvl_jax.errors import ConfigError, OutputError
from medvl_jax.losses import contrastive

# ----------------------------------------------------------------------------- the schema
# Every config (configs/convirt.py, configs/mixed.py and each of their variants) defines every
# key below, with its default, and the code reads them directly (`config.mesh`). The `model`
# section below `model.name` belongs to the model family (`Family.check_config`), and `loss`
# keys other than these to the loss.
#   resume:  RESUME = may differ between a run's config.json and the config that resumes it
#            (it changes neither the shapes of the state, nor the data stream, nor the seed);
#            FIXED = a difference is refused (`check_resumable`). Documented in docs/training.md.
#   must be: what `check` holds the value to: a range, or a tuple of the valid values;
#            None = free, or checked with the part that reads it (data, model, evaluators).
RESUME, FIXED = True, False
POSITIVE_INT = "a positive integer"
SCHEDULES = ("constant", "plateau")
NONFINITE_POLICIES = ("skip", "halt")

# fmt: off
SCHEMA: dict[str, tuple[bool, Any]] = {
  # key                                 resume  must be
  "seed":                               (FIXED,  None),
  "batch_size":                         (FIXED,  POSITIVE_INT),  # global
  "total_steps":                        (RESUME, POSITIVE_INT),
  "log_every":                          (RESUME, POSITIVE_INT),
  "eval_every":                         (RESUME, POSITIVE_INT),
  "checkpoint_every":                   (RESUME, POSITIVE_INT),
  "keep_checkpoints":                   (RESUME, None),
  "nonfinite":                          (RESUME, NONFINITE_POLICIES),  # a policy, not the state
  "nonfinite_max_consecutive":          (RESUME, POSITIVE_INT),
  "accumulate_steps":                   (RESUME, POSITIVE_INT),  # micro-batches, the same batch
  "evaluators":                         (RESUME, None),
  "data.name":                          (FIXED,  None),
  "data.builder_config":                (FIXED,  None),
  "data.data_dir":                      (RESUME, None),  # where the same data lives
  "data.sample_dir":                    (RESUME, None),
  "data.train_split":                   (FIXED,  None),
  "data.eval_split":                    (RESUME, None),
  "data.image_size":                    (FIXED,  None),
  "data.resize":                        (FIXED,  None),
  "data.max_length":                    (FIXED,  None),
  "data.text_mode":                     (FIXED,  None),
  "data.augment_chain":                 (FIXED,  None),
  "data.sources":                       (FIXED,  None),
  "data.allow_repeats":                 (RESUME, None),
  "data.augment.crop_scale":            (FIXED,  None),
  "data.augment.flip_p":                (FIXED,  None),
  "data.augment.rotation":              (FIXED,  None),
  "data.augment.translate":             (FIXED,  None),
  "data.augment.affine_scale":          (FIXED,  None),
  "data.augment.brightness":            (FIXED,  None),
  "data.augment.contrast":              (FIXED,  None),
  "data.augment.blur_sigma":            (FIXED,  None),
  "model.name":                         (FIXED,  None),
  "loss.name":                          (FIXED,  None),
  "loss.impl":                          (RESUME, contrastive.IMPLS),  # the same loss, other layout
  "loss.lam":                           (FIXED,  "in [0, 1]"),
  "loss.temperature":                   (FIXED,  "> 0"),
  "optimizer.lr":                       (RESUME, "> 0"),
  "optimizer.weight_decay":             (RESUME, ">= 0"),
  "optimizer.schedule":                 (FIXED,  SCHEDULES),
  "optimizer.plateau_factor":           (RESUME, None),
  "optimizer.plateau_patience":         (RESUME, None),
  "optimizer.plateau_accumulation":     (RESUME, None),
  "mesh":                               (RESUME, None),  # layout only: a restore reshards
  "sharding.rules":                     (RESUME, None),
  "sharding.fsdp_min_size":             (RESUME, None),
  "distributed.initialization_timeout": (RESUME, None),  # seconds; start-up only
}
# fmt: on
REQUIRED_KEYS = tuple(SCHEMA)
RESUMABLE_KEYS = tuple(k for k, (resume, _) in SCHEMA.items() if resume)
CHECKED_KEYS = tuple(k for k, (_, must_be) in SCHEMA.items() if must_be is not None)


# ----------------------------------------------------------------------------- resume
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}."))
  return {k.rstrip("."): v for k, v in out.items()}


def _resumable(key: str) -> bool:
  return any(key == r or key.startswith(f"{r}.") for r in RESUMABLE_KEYS)


def check_resumable(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """ConfigError (one line, naming the keys) if `config` cannot resume the run in `workdir`.

  Compared with `<workdir>/config.json` (as `run_dir.load_run_config` reads it) only when the
  workdir holds checkpoints (before the first checkpoint there is nothing to be incompatible
  with). Every difference in a key outside `RESUMABLE_KEYS` (a key also covers everything
  under it) is refused. Keys present in only one of the two (a setting added or removed by
  another version of the code) are not compared.
  """
  path = paths.join(workdir, "config.json")
  if not paths.isfile(path) or not checkpoint.has_checkpoints(workdir):
    return
  old = _flat(run_dir.load_run_config(workdir).to_dict())
  new = _flat(json.loads(run_dir.config_json(config)))
  differing = [k for k in sorted(old.keys() & new.keys()) if old[k] != new[k] and not _resumable(k)]
  if differing:
    shown = ", ".join(f"{k} ({old[k]!r:.40} -> {new[k]!r:.40})" for k in differing[:6])
    raise ConfigError(
      f"the config differs from the run in {workdir} (config.json) in "
      f"{'keys' if len(differing) > 1 else 'a key'} that cannot change on resume: {shown}"
      f"{' ...' if len(differing) > 6 else ''}; use a new --workdir, or pass "
      "--restart_from_scratch to start this one over"
    )


def _valid(key: str, value: Any, valid) -> None:
  if value not in valid:
    raise ConfigError(f"{key}={value!r} is unknown; valid: {', '.join(sorted(valid))}")


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


# ----------------------------------------------------------------------------- required keys
def check_required(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first key of `REQUIRED_KEYS` that `config` lacks."""
  for key in REQUIRED_KEYS:
    try:
      _value(config, key)
    except (KeyError, TypeError, AttributeError):
      raise ConfigError(f"config.{key} is missing") from None


# ----------------------------------------------------------------------------- value ranges
def _number(key: str, value: Any) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{key}={value!r} is not a number") from None
  if not math.isfinite(x):
    raise ConfigError(f"{key}={value!r} must be finite")
  return x


_RANGES = {"> 0": lambda x: x > 0, ">= 0": lambda x: x >= 0, "in [0, 1]": lambda x: 0 <= x <= 1}


def _check_values(config: ml_collections.ConfigDict) -> None:
  """Each value of `CHECKED_KEYS` against its `must be` in `SCHEMA`."""
  for key in CHECKED_KEYS:
    must_be, value = SCHEMA[key][1], _value(config, key)
    if isinstance(must_be, tuple):
      _valid(f"config.{key}", value, must_be)
    elif must_be == POSITIVE_INT:
      if int(value) <= 0:
        raise ConfigError(f"config.{key}={value} must be {must_be}")
    elif not _RANGES[must_be](_number(f"config.{key}", value)):
      raise ConfigError(f"config.{key}={value} must be {must_be}")


# ----------------------------------------------------------------------------- model files
LOCAL_MODEL_FILES = ("init", "tokenizer")  # keys of each model.<tower> section


def _check_local_model_files(model: ml_collections.ConfigDict) -> None:
  """Pretrained weights and tokenizers are read from local paths (Hugging Face, torchvision
  and timm files): a URL there is refused in one line, before the family looks for the file."""
  for tower, section in model.items():
    if not isinstance(section, ml_collections.ConfigDict):
      continue
    for key in LOCAL_MODEL_FILES:
      value = section.get(key)
      if isinstance(value, str) and paths.is_url(value):
        raise ConfigError(
          f"config.model.{tower}.{key}={value!r}: a URL; pretrained files are read from a "
          "local path only (copy them to local disk first)"
        )


# ----------------------------------------------------------------------------- data
def _check_data(config: ml_collections.ConfigDict) -> None:
  data = config.data
  # The builder class only (imported by name, its declared features): no data is touched.
  default_config = corpora.get(data.name).default_config
  if not data.sources and "paired" not in corpora.kinds(data.name, default_config):
    paired = [
      n for n in corpora.names() if "paired" in corpora.kinds(n, corpora.get(n).default_config)
    ]
    raise ConfigError(
      f"config.data.name={data.name!r} (builder_config="
      f"{data.builder_config!r}) has no image-text pairs to pretrain on; "
      f"valid: {', '.join(paired)}"
    )
  corpora.check_config(data.name, data.builder_config, key="config.data.builder_config")
  if data.image_size > data.resize:
    raise ConfigError(
      f"config.data.image_size={data.image_size} is larger than config.data.resize={data.resize}"
    )
  # Every source (config.data.sources, or the one-source shorthand): name, builder config,
  # kind, weight, augmentation chain, split; metadata only, no record is read.
  sources.check_sources(config)


# ----------------------------------------------------------------------------- batch layout
def _check_batch_layout(config: ml_collections.ConfigDict, family) -> None:
  """config.accumulate_steps (medvl_jax.train.accumulate): divides the batch, fits the family."""
  steps = config.accumulate_steps
  if not isinstance(steps, int) or steps <= 0:
    raise ConfigError(f"config.accumulate_steps={steps!r} must be a positive integer")
  if config.batch_size % steps:
    raise ConfigError(
      f"config.accumulate_steps={steps} does not divide config.batch_size={config.batch_size}"
    )
  if steps > 1 and family.make_split is None:
    raise ConfigError(
      f"config.accumulate_steps={steps}: model family {family.name!r} does not support "
      "accumulation; use 1"
    )


# ----------------------------------------------------------------------------- evaluators
def check_evaluator(name: str, settings: dict[str, Any], key: str = "config.evaluators") -> None:
  """An evaluator's name and settings against its constructor, without building it."""
  from medvl_jax import evaluate  # pylint: disable=g-import-not-at-top

  evaluate.check_settings(name, settings, key)


def _check_evaluators(config: ml_collections.ConfigDict) -> None:
  for i, entry in enumerate(config.evaluators or []):
    entry = dict(entry)
    key = f"config.evaluators[{i}]"
    if "name" not in entry:
      raise ConfigError(f"{key}: no 'name' (entries are {{'name': task, **settings}})")
    name = entry.pop("name")
    check_evaluator(name, entry, key)
  if config.evaluators:
    import jax  # pylint: disable=g-import-not-at-top

    if jax.process_count() > 1:
      raise ConfigError(
        "config.evaluators runs on one process only; on several hosts, "
        "evaluate checkpoints with `python -m medvl_jax.evaluate`"
      )


# ----------------------------------------------------------------------------- preflight
def check_workdir(workdir: str | os.PathLike) -> str:
  """Creates `workdir` if needed and proves it writable (a probe file); one line if not.

  A URL: its bucket is probed first (`paths.check_reachable`: a typo'd bucket or an
  unreachable endpoint fails in seconds, StorageError naming the URL), then a probe object is
  written and removed through `medvl_jax.paths`. Returns the workdir as given (a string).
  """
  workdir = os.fspath(workdir)
  paths.check_reachable(workdir)
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise OutputError(f"--workdir={workdir}: exists and is not a directory")
  try:
    paths.check_writable(workdir)
  except OSError as e:
    if paths.is_url(workdir):
      raise
    raise OutputError(
      f"--workdir={workdir}: cannot create or write to it ({e.strerror or e})"
    ) from e
  return workdir


def _mb(n: float) -> str:
  return f"{n / 1e6:.1f} MB"


def check_disk(workdir: str | os.PathLike, abstract_state: Any, copies: int = 2) -> int:
  """Free space for `copies` checkpoints, each estimated as the state's bytes (+10% for
  Orbax metadata); returns the estimate of one. Measured where checkpoints are written.

  Local disks only: a bucket has no free space to ask for (its quota is the project's), so a
  URL workdir is not checked (logged once).
  """
  import jax  # pylint: disable=g-import-not-at-top

  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  estimate = int(nbytes * 1.1)
  if paths.is_url(workdir):
    logging.info(
      "workdir %s is in a bucket: no free-space check (checkpoints of ~%s each)",
      workdir,
      _mb(estimate),
    )
    return estimate
  where = pathlib.Path(workdir) / "checkpoints"
  where = where if where.is_dir() else pathlib.Path(workdir)
  free = shutil.disk_usage(where).free
  if free < copies * estimate:
    raise OutputError(
      f"{where}: {_mb(free)} free, but {copies} checkpoints of this model need "
      f"~{_mb(copies * estimate)} ({_mb(estimate)} each); free some space or choose "
      "another --workdir"
    )
  return estimate


def check_batch_fits(config: ml_collections.ConfigDict) -> None:
  """batch_size (each source's share of it) <= its train split, unless data.allow_repeats.

  Reads split sizes from the prepared datasets' metadata (no record is read): call it after
  `sources.prepare`.
  """
  if config.data.allow_repeats:
    return
  resolved = sources.sources(config)
  total = sum(s.weight for s in resolved)
  for source, n in zip(resolved, sources.split_sizes(config, resolved)):
    rows = math.ceil(config.batch_size * source.weight / total)
    if rows > n:
      raise ConfigError(
        f"config.batch_size={config.batch_size} puts {rows} rows of {source.where} "
        f"({source.name}/{source.builder_config}, split {source.split!r}) in every batch, "
        f"but the split has {n} examples: rows would repeat within a batch; lower the batch "
        "size, or pass --config.data.allow_repeats=True"
      )


# ----------------------------------------------------------------------------- all
def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (or WeightsError for an unusable text checkpoint) on the first mistake.

  Reads nothing but the text checkpoint's config.json and writes nothing.
  """
  check_required(config)
  family = families.get(config.model.name)
  corpora.get(config.data.name, key="config.data.name")
  if config.loss.name not in family.losses:  # e.g. a ConVIRT loss on the mixed model
    raise ConfigError(
      f"config.loss.name={config.loss.name!r} does not fit "
      f"config.model.name={config.model.name!r}; valid: "
      f"{', '.join(family.losses)}"
    )
  _check_values(config)
  _check_local_model_files(config.model)
  family.check_config(config.model)
  _check_data(config)
  _check_batch_layout(config, family)
  _check_evaluators(config)
