"""Each model family's interop half, selected by `config.model.name` as `families.get` selects
its training half: pretrained towers in, a trained model out to PyTorch files.

  io = registry.get(config.model.name)
  variables = io.init_from_pretrained(host_variables, config.model)
  recorded = io.export(model, params, batch_stats, config, out_dir)
  family_card = io.card(model, config, recorded)               # model_card.FamilyCard

Adding a family: a module under `medvl_jax/interop/` that defines `INTEROP = FamilyInterop(...)`,
and its name in `_MODULES` below (the same name as in `families._MODULES`).
"""

from collections.abc import Callable
import dataclasses
import importlib
from typing import Any

from medvl_jax.errors import ConfigError

# config.model.name -> module defining INTEROP (imported on use: torch-side helpers and
# safetensors are paid only by the runs that import or export weights).
_MODULES = {
  "convirt": "medvl_jax.interop.convirt",
  "mixed": "medvl_jax.interop.mixed",
}


@dataclasses.dataclass(frozen=True)
class FamilyInterop:
  """What pretrained import, export and the model card need to know about one family.

  Attributes:
    name: the `config.model.name` that selects it.
    init_from_pretrained: (host variables, config.model) -> variables with the checkpoints of
      `model.text.init` / `model.image.init` imported ('' keeps a tower's initialisation);
      WeightsError on a missing or mismatching checkpoint.
    export: (model, params, batch_stats, config, out_dir) -> dict; writes the family's
      PyTorch / Hugging Face files into `out_dir` (a fresh temporary directory that
      `interop.export` renames into place) and returns what export.json records about them
      (files, preprocessing, pooling, the embedding math, package versions).
    card: (model, config, recorded) -> `model_card.FamilyCard`: the family's part of the
      exported model card (title, tags, towers, a PyTorch loading snippet); `recorded` is what
      `export` returned.
  """

  name: str
  init_from_pretrained: Callable[[dict, Any], dict]
  export: Callable[[Any, Any, Any, Any, Any], dict]
  card: Callable[[Any, Any, dict], Any]


def names() -> tuple[str, ...]:
  return tuple(sorted(_MODULES))


def get(name: str) -> FamilyInterop:
  """The interop half of family `name`; ConfigError naming the valid ones otherwise."""
  if name not in _MODULES:
    raise ConfigError(
      f"config.model.name={name!r} has no weights import/export; valid: {', '.join(names())}"
    )
  interop = importlib.import_module(_MODULES[name]).INTEROP
  if interop.name != name:
    raise AssertionError(f"{_MODULES[name]}.INTEROP is named {interop.name!r}, not {name!r}")
  return interop
