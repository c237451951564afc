"""Every name and nested choice of a training config, checked in one pass before any I/O.

`train.train_and_evaluate` calls `check(config)` first: before the workdir or its config.json
is written, before any dataset is read or built and before any model is initialised. Each
mistake is one `ConfigError` line naming the key and the valid values. Nothing here reads data:
a registry lookup, a builder class (imported by name, its configs listed) and, for a pretrained
text tower, the small `config.json` of its directory.

Checks, in order: registry names (model, dataset, loss, schedule), the model's nested choices
(dtype, image variant, mean/std, checkpoint paths), the data section (builder config, what the
dataset can serve, sizes), the step counts, and each evaluator's name and settings (against the
evaluator constructor's signature, without building it).
"""

from typing import Any

import ml_collections

from medvl_jax import corpora, families, input_pipeline, losses
from medvl_jax.errors import ConfigError

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
  input_pipeline.check_sources(config)


# ----------------------------------------------------------------------------- batch layout
def _check_batch_layout(config: ml_collections.ConfigDict, family) -> None:
  """config.loss.impl and config.accumulate_steps (medvl_jax.losses, medvl_jax.accumulate)."""
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
  _check_evaluators(config)
