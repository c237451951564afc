"""Downstream evaluation of pretrained encoders; one module per task, one contract.

  ev = EVALUATORS[name](encoders, **cfg)     # encoders: features.Encoders (the predict_fn)
  for metric, value in ev.run(state): ...    # state: anything with .params and .batch_stats
  ev.write_plots(out_dir)                    # PNGs of the last run (CLI only)

Used by `python -m medvl_jax.evaluate` and, through `config.evaluators`, by training.
"""
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


def build_all(model, config, tokenizer) -> list:
  """The evaluators of `config.evaluators` (entries {'name': task, **settings}) for training."""
  from medvl_jax.evaluate import features  # pylint: disable=g-import-not-at-top
  if not config.evaluators:
    return []
  encoders = features.Encoders(model, config, tokenizer)
  return [get(e["name"])(encoders, **{k: v for k, v in dict(e).items() if k != "name"})
          for e in config.evaluators]


def run_all(evaluators: list, state) -> dict[str, float]:
  """Scalars of every evaluator (undefined values left out, TensorBoard takes numbers only)."""
  return {k: v for ev in evaluators for k, v in ev.run(state) if v is not None}
