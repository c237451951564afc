"""Initialisation of a model's towers from the PyTorch-format checkpoints named in the config
(`model.text.init`, `model.image.init`), through the family's import (`registry`)."""

from collections.abc import Mapping
from typing import Any

from medvl_jax.interop import registry


def configured(model_cfg: Any) -> bool:
  """Whether `model_cfg` names a checkpoint to import into either tower."""
  return bool(model_cfg.text.init or model_cfg.image.init)


def init_from_pretrained(variables: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
  """`variables` (host arrays) with the towers of `model_cfg.text.init` / `model_cfg.image.init`
  imported by the family `model_cfg.name`; WeightsError on a missing or mismatching checkpoint."""
  return registry.get(model_cfg.name).init_from_pretrained(variables, model_cfg)
