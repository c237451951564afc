"""Model families: one small record per family, the only place that knows a family's shape.

The trainer (`train/`), `evaluate/` and `bench/` reach a model only through its `Family`; none
of them names a family. `config.model.name` selects it:

  family = families.get(config.model.name)
  model = family.build(config.model)
  variables = family.init(model, dummy_batch, rng)            # {'params', 'batch_stats'?}
  loss_fn = family.make_loss(config, mesh)                    # mesh: for config.loss.impl
  loss, metrics, new_batch_stats = loss_fn(model, variables, batch, rng, train=True)
  split = family.make_split(config, mesh)   # the same loss in parts, for accumulation

`batch` is the whole batch in the layout of `medvl_jax.data.batch` (image, input_ids,
attention_mask, has_image, has_text, source; eval batches add `mask`), so a family's loss sees
its targets and which rows carry which modality. `rng` is the step's key; the family derives
its streams from it (`dropout`, and e.g. `masking`).

A family's weights in and out (pretrained import, export to PyTorch) are its other half, in
`medvl_jax.interop` (selected by the same name there).

Adding a family: a module under `medvl_jax/families/` that defines `FAMILY = Family(...)`, and
its name in `_MODULES` below; its interop half in `medvl_jax/interop/`.
"""

from collections.abc import Callable
import dataclasses
import importlib
import re
from typing import Any

import jax

from medvl_jax.data import batch as batch_lib
from medvl_jax.errors import ConfigError
from medvl_jax.parallel import sharding

# config.model.name -> module defining FAMILY (imported on use: a family's model code is paid
# only by the runs that use it).
_MODULES = {
  "convirt": "medvl_jax.families.convirt",
  "mixed": "medvl_jax.families.mixed",
}


@dataclasses.dataclass(frozen=True)
class Split:
  """A family's training loss in the parts that embedding-cache accumulation
  (`medvl_jax.train.accumulate`) needs: loss = combine(embeddings of all rows, sum over
  micro-batches of `micro`'s sums, batch).

  Attributes:
    prepare: (model, variables, batch, rng) -> a pytree of per-row arrays [N, ...] drawn once
      for the whole batch (e.g. the mixed model's MLM/MVM masks), sliced like the batch.
    micro: (model, variables, micro_batch, prepared rows, rng) -> ((image_embed, text_embed),
      {name: float32 scalar that adds up over rows}, new batch_stats); train mode.
    combine: (model, image_embed [N, d], text_embed [N, d], summed stats, batch) -> (loss,
      metrics as `make_loss`'s loss_fn returns them).
  """

  prepare: Callable[..., Any]
  micro: Callable[..., Any]
  combine: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Family:
  """What the trainer and the evaluators need to know about one model family.

  Attributes:
    name: the `config.model.name` that selects it.
    build: config.model -> flax.linen Module.
    init: (model, batch, rng) -> freshly initialised variables for a (dummy) batch.
    make_loss: (config, mesh=None) -> loss_fn(model, variables, batch, rng, train) ->
      (scalar loss, {metric name: scalar}, new batch_stats); metric names as `metrics`.
      `mesh` is the one the batch is sharded over (`config.loss.impl`, `losses.contrastive.loss`).
    metrics: names of the metrics `loss_fn` always returns besides the loss (logged as
      train_<name> and val_<name>; a family may add config-dependent ones, e.g. per-scale MVM).
    summary_metrics: the subset shown on the validation log line.
    trainable_mask: (params, config.model) -> bool tree (False = frozen: no gradient, no
      optimizer state).
    encode_image: (model, variables, uint8 images [N, S, S, 1]) -> (pooled features h [N, D],
      embeddings z [N, d]); `variables` = {'params', 'batch_stats'}; pure, for the evaluators
      (`evaluate.features.Encoders` jits and batches it).
    encode_text: (model, variables, input_ids [N, L], attention_mask [N, L]) -> embeddings
      z [N, d]; likewise.
    losses: the `config.loss.name` values this family trains with.
    check_config: config.model -> None; ConfigError naming the key on a bad nested choice
      (called by `config_check` before anything is read or built).
    make_split: (config, mesh=None) -> `Split`, the training loss in parts for
      `config.accumulate_steps` > 1; None = the family does not support accumulation.
  """

  name: str
  build: Callable[[Any], Any]
  init: Callable[[Any, dict, Any], dict]
  make_loss: Callable[[Any], Callable]
  metrics: tuple[str, ...]
  summary_metrics: tuple[str, ...]
  trainable_mask: Callable[[Any, Any], Any]
  encode_image: Callable[[Any, Any, Any], tuple[Any, Any]]
  encode_text: Callable[[Any, Any, Any, Any], Any]
  check_config: Callable[[Any], None]
  losses: tuple[str, ...]
  make_split: Callable[..., Split] | None = None


def names() -> tuple[str, ...]:
  return tuple(sorted(_MODULES))


def get(name: str) -> Family:
  """The family registered as `name`; ConfigError naming the valid ones otherwise."""
  if name not in _MODULES:
    raise ConfigError(f"config.model.name={name!r} is unknown; valid: {', '.join(names())}")
  family = importlib.import_module(_MODULES[name]).FAMILY
  if family.name != name:
    raise AssertionError(f"{_MODULES[name]}.FAMILY is named {family.name!r}, not {name!r}")
  return family


def row_mask(batch: dict) -> Any:
  """AND of the batch's row masks that are present (`mask`, `has_image`, `has_text`), or None
  when the batch has none of them (every row counts)."""
  present = [batch[k] for k in ("mask", "has_image", "has_text") if k in batch]
  if not present:
    return None
  out = present[0].astype(bool)
  for m in present[1:]:
    out = out & m.astype(bool)
  return out


def text_tower_mask(params, model_cfg):
  """Trainable mask of a family with a BERT text tower at params['text']: False for its
  embeddings (`model.text.freeze_embeddings`) and its first K layers (`model.text.frozen_layers`,
  -1 = half: ConVIRT freezes 6 of 12), True everywhere else."""
  num_layers = len(params["text"]["encoder"]["layer"])
  k = model_cfg.text.frozen_layers
  k = num_layers // 2 if k < 0 else k
  if k > num_layers:
    raise ConfigError(f"config.model.text.frozen_layers={k} exceeds the {num_layers} layers")
  frozen = [rf"^text/encoder/layer/{i}/" for i in range(k)]
  if model_cfg.text.freeze_embeddings:
    frozen.append(r"^text/embeddings/")
  regex = re.compile("|".join(frozen)) if frozen else None
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not (regex and regex.search(sharding.path_str(path))), params
  )


def dummy_batch(config, batch_size: int = 1) -> dict[str, Any]:
  """A train batch of the layout in `medvl_jax.data.batch` (zeros; every row has image and text)."""
  return batch_lib.from_config(config, batch_size)


def init_variables(model, config, rng: jax.Array) -> dict:
  """Randomly initialised flax variables ({'params', 'batch_stats'}) for a 1-example batch."""
  return get(config.model.name).init(model, dummy_batch(config), rng)
