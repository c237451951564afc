"""Model registry: config.model.name -> builder(config.model) -> flax.linen Module."""
from collections.abc import Callable

from medvl_jax.errors import ConfigError


def _convirt(model_cfg):
  from medvl_jax.models import convirt  # pylint: disable=g-import-not-at-top
  return convirt.from_config(model_cfg)


MODELS: dict[str, Callable] = {"convirt": _convirt}


def build(model_cfg):
  if model_cfg.name not in MODELS:
    raise ConfigError(f"config.model.name={model_cfg.name!r} is unknown; "
                      f"valid: {', '.join(sorted(MODELS))}")
  return MODELS[model_cfg.name](model_cfg)
