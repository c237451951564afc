"""The validation pass: the train loss and metrics on the eval split, at an evaluation step."""

import jax
import ml_collections

from medvl_jax.data import streams
from medvl_jax.parallel import sharding


def validation_metrics(
  eval_fn, state, config: ml_collections.ConfigDict, tokenizer, mesh
) -> dict[str, float]:
  """val_<metric>: the mean over the real (unpadded) rows of `config.data.eval_split`.

  `eval_fn(state, global batch)` is the jitted `step.eval_step` (sums over the batch's real
  rows); each host reads its share of the split, padded so all hosts run the same steps.
  """
  totals = {}
  for local in streams.create_eval_iterator(
    config,
    tokenizer,
    config.data.eval_split,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    out = jax.device_get(eval_fn(state, sharding.to_global(local, mesh)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop("count", 0.0), 1.0)
  return {f"val_{k.removesuffix('_sum')}": v / count for k, v in totals.items()}
