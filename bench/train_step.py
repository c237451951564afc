r"""Train-step throughput of the full-size ConVIRT model on synthetic batches (compute only).

  python bench/train_step.py                                   # ResNet-50 + MiniLM shape, fp32
  python bench/train_step.py --text=bert-base --batch=128 --dtype=bfloat16 --steps=20

Times the jitted, donated `step.train_step` (the function the trainer runs) on random uint8
images and token ids already on the device, so the figure is the model's, not the input
pipeline's (see bench/input_pipeline.py for that). Prints s/step, examples/s, the analytic
model FLOPs per step and the achieved FLOP/s (divide by the chip's peak for MFU). Imports no
TensorFlow, so it runs on an accelerator machine with only jax/flax/optax/ml_collections installed.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import convirt  # noqa: E402
from medvl_jax import batch as batch_lib  # noqa: E402
from medvl_jax import families, sharding, step  # noqa: E402

TEXT_SHAPES = {
  "minilm": dict(
    vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536
  ),
  "bert-base": dict(
    vocab_size=28996, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
  ),  # Bio_ClinicalBERT, as in the paper
}


def model_flops(batch: int, image_size: int, max_length: int, text: dict, frozen: int) -> float:
  """Analytic FLOPs of one train step (2 per multiply-add; backward = 2x forward).

  ResNet-50: 4.09 GMACs per 224^2 image, trained end to end (3x forward). BERT: per token and
  layer 12 H^2 + 2 L H MACs (projections, FFN, attention scores/values); frozen layers run
  forward only, and no gradient flows below them. Heads and the loss are negligible.
  XLA's own cost analysis is printed too but excludes cuDNN/cuBLAS custom calls on GPU.
  """
  resnet = 4.09e9 * (image_size / 224) ** 2 * batch * 3
  h, l = text["hidden_size"], max_length
  per_layer = (12 * h * h + 2 * l * h) * l * batch
  bert = per_layer * (frozen + 3 * (text["num_layers"] - frozen))
  return 2.0 * (resnet + bert)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--text", choices=sorted(TEXT_SHAPES), default="minilm")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--max_length", type=int, default=128)
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args()

  cfg = convirt.get_config()
  cfg.batch_size = args.batch
  cfg.data.image_size, cfg.data.max_length = args.image_size, args.max_length
  cfg.model.dtype = args.dtype
  cfg.model.text.init = ""
  cfg.model.text.update(TEXT_SHAPES[args.text], max_position_embeddings=512)
  model = families.get(cfg.model.name).build(cfg.model)
  init_rng, step_rng = step.rngs(cfg)
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  variables = jax.jit(lambda r: step.init_variables(model, cfg, r), out_shardings=rep)(init_rng)
  mask = families.get(cfg.model.name).trainable_mask(variables["params"], cfg.model)
  tx = step.make_optimizer(cfg.optimizer, mask)
  state = jax.jit(
    lambda v: step.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=v["params"],
      batch_stats=v["batch_stats"],
      opt_state=tx.init(v["params"]),
    ),
    out_shardings=rep,
  )(variables)
  loss_fn = families.get(cfg.model.name).make_loss(cfg)

  n, s, l = args.batch, args.image_size, args.max_length
  batch = batch_lib.random(n, s, l, seed=0)  # The layout of medvl_jax.batch, paired rows.
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))

  fn = jax.jit(
    lambda st, b: step.train_step(
      st, b, model=model, tx=tx, loss_fn=loss_fn, mask=mask, rng=step_rng
    ),
    donate_argnums=0,
  )
  t0 = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  sec = float(np.median(times))
  frozen = cfg.model.text.num_layers // 2
  mflops = model_flops(n, s, l, TEXT_SHAPES[args.text], frozen)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(
    json.dumps(
      {
        "device": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "batch": n,
        "text": args.text,
        "dtype": args.dtype,
        "params_M": round(n_params / 1e6, 1),
        "compile_s": round(compile_s, 1),
        "s_per_step_median": round(sec, 4),
        "s_per_step_min": round(min(times), 4),
        "examples_per_s": round(n / sec, 1),
        "model_gflop": round(mflops / 1e9, 1),
        "model_tflops_per_s": round(mflops / sec / 1e12, 2),
        "xla_counted_gflop": round(flops / 1e9, 1),
        "loss": float(metrics["loss"]),
      }
    )
  )


if __name__ == "__main__":
  main()
