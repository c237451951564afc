"""Every name and nested choice of a training config, checked in one pass before any I/O.

`train.train_and_evaluate` calls `check(config)` first: before the workdir or its config.json
is written, before any dataset is read or built and before any model is initialised. Each
mistake is one `ConfigError` line naming the key and the valid values. Nothing here reads data:
a registry lookup, a builder class (imported by name, its configs listed) and, for a pretrained
text tower, the small `config.json` of its directory.

Checks, in order: registry names (model, dataset, loss, schedule), the model's nested choices
(dtype, image variant, mean/std, checkpoint paths), the data section (builder config, what the
dataset can serve, sizes), the step counts, value ranges (lr > 0, 0 <= loss.lam <= 1,
loss.temperature > 0), and each evaluator's name and settings (against the evaluator
constructor's signature, without building it).

The preflight of a training run (`train.train_and_evaluate`, before any data is built or
anything is compiled) adds what needs the filesystem, each failure one line:
`check_workdir` (creatable, writable, not a file), `check_disk` (free space for two
checkpoints, estimated from the state's bytes), `check_batch_fits` (batch_size <= each train
split, read from the prepared dataset's metadata, unless data.allow_repeats).
"""

import math
import os
import pathlib
import shutil
from typing import Any

import ml_collections

from medvl_jax import cli, families, losses
from medvl_jax.data import corpora, sources
from medvl_jax.errors import ConfigError, OutputError

SCHEDULES = ("constant", "plateau")
NONFINITE_POLICIES = ("skip", "halt")
POSITIVE_INTS = (
  "batch_size",
  "total_steps",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "nonfinite_max_consecutive",
)


def _valid(key: str, value: Any, valid) -> None:
  if value not in valid:
    raise ConfigError(f"{key}={value!r} is unknown; valid: {', '.join(sorted(valid))}")


# ----------------------------------------------------------------------------- model
# ----------------------------------------------------------------------------- data
def _check_data(config: ml_collections.ConfigDict) -> None:
  data = config.data
  # The builder class only (imported by name, its declared features): no data is touched.
  default_config = corpora.get(data.name).default_config
  if not data.get("sources") and "paired" not in corpora.kinds(data.name, default_config):
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
  """config.loss.impl and config.accumulate_steps (medvl_jax.losses, medvl_jax.train.accumulate)."""
  _valid("config.loss.impl", config.loss.get("impl", losses.DEFAULT_IMPL), losses.IMPLS)
  steps = config.get("accumulate_steps", 1)
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


# ----------------------------------------------------------------------------- value ranges
def _number(key: str, value: Any) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{key}={value!r} is not a number") from None
  if not math.isfinite(x):
    raise ConfigError(f"{key}={value!r} must be finite")
  return x


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  if _number("config.optimizer.lr", config.optimizer.lr) <= 0:
    raise ConfigError(f"config.optimizer.lr={config.optimizer.lr} must be > 0")
  if "weight_decay" in config.optimizer:
    if _number("config.optimizer.weight_decay", config.optimizer.weight_decay) < 0:
      raise ConfigError(
        f"config.optimizer.weight_decay={config.optimizer.weight_decay} must be >= 0"
      )
  if "lam" in config.loss and not 0 <= _number("config.loss.lam", config.loss.lam) <= 1:
    raise ConfigError(f"config.loss.lam={config.loss.lam} must be in [0, 1]")
  if "temperature" in config.loss:
    if _number("config.loss.temperature", config.loss.temperature) <= 0:
      raise ConfigError(f"config.loss.temperature={config.loss.temperature} must be > 0")


# ----------------------------------------------------------------------------- preflight
def check_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates `workdir` if needed and proves it writable (a probe file); one line if not."""
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise OutputError(f"--workdir={workdir}: exists and is not a directory")
  try:
    cli.probe_write(workdir)
  except OSError as e:
    raise OutputError(
      f"--workdir={workdir}: cannot create or write to it ({e.strerror or e})"
    ) from e
  return workdir


def _mb(n: float) -> str:
  return f"{n / 1e6:.1f} MB"


def check_disk(workdir: str | os.PathLike, abstract_state: Any, copies: int = 2) -> int:
  """Free space for `copies` checkpoints, each estimated as the state's bytes (+10% for
  Orbax metadata); returns the estimate of one. Measured where checkpoints are written."""
  import jax  # pylint: disable=g-import-not-at-top

  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  estimate = int(nbytes * 1.1)
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
  if config.data.get("allow_repeats", False):
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
  family = families.get(config.model.name)
  corpora.get(config.data.name, key="config.data.name")
  if config.loss.name not in family.losses:  # e.g. a ConVIRT loss on the mixed model
    raise ConfigError(
      f"config.loss.name={config.loss.name!r} does not fit "
      f"config.model.name={config.model.name!r}; valid: "
      f"{', '.join(family.losses)}"
    )
  _valid("config.optimizer.schedule", config.optimizer.schedule, SCHEDULES)
  _valid("config.nonfinite", config.nonfinite, NONFINITE_POLICIES)
  family.check_config(config.model)
  _check_data(config)
  for key in POSITIVE_INTS:
    if int(config[key]) <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be a positive integer")
  _check_batch_layout(config, family)
  _check_ranges(config)
  _check_evaluators(config)
