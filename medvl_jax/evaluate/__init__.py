"""Downstream evaluation of pretrained encoders; one module per task, one contract.

  ev = EVALUATORS[name](encoders, **cfg)     # encoders: features.Encoders (the predict_fn)
  for metric, value in ev.run(state): ...    # state: anything with .params and .batch_stats
  ev.write_plots(out_dir)                    # PNGs of the last run (CLI only)

Used by `python -m medvl_jax.evaluate` and, through `config.evaluators`, by training.
"""

import inspect
from typing import Any

from medvl_jax.errors import ConfigError
from medvl_jax.evaluate import finetune, linear_probe, regeneration, retrieval, zeroshot

EVALUATORS = {
  "retrieval": retrieval.Evaluator,
  "linear_probe": linear_probe.Evaluator,
  "finetune": finetune.Evaluator,
  "zeroshot": zeroshot.Evaluator,
  "regeneration": regeneration.Evaluator,
}


def get(name: str):
  if name not in EVALUATORS:
    raise ConfigError(f"unknown evaluation task {name!r}; valid: {', '.join(sorted(EVALUATORS))}")
  return EVALUATORS[name]


def check_settings(name: str, settings: dict[str, Any], key: str = "config.evaluators") -> None:
  """Checks an evaluator's name and its settings against its constructor, without building it."""
  if name not in EVALUATORS:
    raise ConfigError(f"{key} name={name!r} is unknown; valid: {', '.join(sorted(EVALUATORS))}")
  signature = inspect.signature(EVALUATORS[name])
  params = list(signature.parameters.values())[1:]  # after `encoders`
  if any(p.kind == p.VAR_KEYWORD for p in params):
    return
  valid = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
  unknown = sorted(set(settings) - set(valid))
  if unknown:
    raise ConfigError(
      f"{key} ({name}): unknown setting {unknown[0]!r}; valid: {', '.join(sorted(valid))}"
    )
  missing = [
    p.name
    for p in params
    if p.default is p.empty
    and p.name not in settings
    and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
  ]
  if missing:
    raise ConfigError(f"{key} ({name}): setting {missing[0]!r} is required")


def build_all(model, config, tokenizer) -> list:
  """The evaluators of `config.evaluators` (entries {'name': task, **settings}) for training."""
  from medvl_jax.evaluate import features  # pylint: disable=g-import-not-at-top

  if not config.evaluators:
    return []
  encoders = features.Encoders(model, config, tokenizer)
  return [
    get(e["name"])(encoders, **{k: v for k, v in dict(e).items() if k != "name"})
    for e in config.evaluators
  ]


def run_all(evaluators: list, state) -> dict[str, float]:
  """Scalars of every evaluator (undefined values left out, TensorBoard takes numbers only)."""
  return {k: v for ev in evaluators for k, v in ev.run(state) if v is not None}
